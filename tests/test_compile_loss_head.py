"""The fused loss head as one opaque op (mmfm/ops/linear_cross_entropy.py:
masked_linear_cross_entropy), which lets torch.compile trace the model to its loss without a graph
break (tests/test_train_switches.py checks the compiled model). Here: the op computes exactly what
the eager head computed before it existed (select the labelled rows, then linear_cross_entropy on
them), and its schema, fake and autograd registration pass torch.library.opcheck."""
import pytest
import torch

from mmfm.ops.linear_cross_entropy import _masked_op, linear_cross_entropy, masked_linear_cross_entropy


def _inputs(seed: int, n: int = 37, d: int = 16, v: int = 50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.4] = -100
    w = torch.rand(n, generator=g)
    return h, W, labels, w


@pytest.mark.parametrize("seed,dtype,chunk", [(0, torch.float32, 8), (1, torch.float32, None), (2, torch.bfloat16, 5)])
def test_masked_op_equals_the_selected_rows_through_linear_cross_entropy(seed, dtype, chunk):
    h, W, labels, w = _inputs(seed, dtype=dtype)
    rows = torch.nonzero(labels != -100).squeeze(1)
    ref_loss, ref_ce = linear_cross_entropy(h[rows], W, labels[rows], w[rows], chunk=chunk)
    ref_loss.backward()
    ref_gh, ref_gw = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    loss, ce = masked_linear_cross_entropy(h, W, labels, w, chunk=chunk)
    (2.0 * loss).backward()                     # backward scales the forward's gradients
    assert torch.equal(loss, ref_loss) and torch.equal(ce[rows], ref_ce) and not ce.requires_grad
    assert bool((ce[labels == -100] == 0).all()) and bool((h.grad[labels == -100] == 0).all())
    assert torch.equal(h.grad, 2.0 * ref_gh) and torch.equal(W.grad, 2.0 * ref_gw)
    assert h.grad.dtype == dtype and W.grad.dtype == dtype


def test_masked_op_passes_opcheck_and_checks_its_arguments():
    h, W, labels, w = _inputs(3, n=12, d=8, v=20)
    for want in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(_masked_op, (h, W, labels, w, 4, *want),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        loss, _ = masked_linear_cross_entropy(h, W, labels, w)
    assert torch.isfinite(loss)
    bad = labels.clone()
    bad[0] = 20
    with pytest.raises(ValueError, match=r"labels: every label must lie in \[0, 20\) or be -100"):
        masked_linear_cross_entropy(h, W, bad, w)
    with pytest.raises(ValueError, match=r"token_weights: expected \[N\]"):
        masked_linear_cross_entropy(h, W, labels, w[:3])
    all_ignored = torch.full_like(labels, -100)      # a batch with no labels: zero loss, zero gradient
    loss, ce = masked_linear_cross_entropy(h, W, all_ignored, w)
    loss.backward()
    assert float(loss.detach()) == 0 and not ce.any() and not h.grad.any() and not W.grad.any()
