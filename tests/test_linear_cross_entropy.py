"""The fused chunked output projection + cross-entropy against the plain composition (full logits,
then F.cross_entropy), alone and as the model's training loss (Transformer.loss /
model_loss_and_report) for every objective, dense and Mixture-of-Transformers."""
import pytest
import torch

from mmfm.models import Transformer
from mmfm.models.config import ModelConfig
from mmfm.objectives import (ObjectiveConfig, build_objective, loss_and_report,
                             model_loss_and_report)
from mmfm.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from mmfm.vocab import Vocab


def _inputs(N=37, D=16, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(V, (N,), generator=g)
    w = torch.rand(N, generator=g)
    w[::5] = 0.0                                   # no_loss rows: CE reported, no gradient
    return h, W, labels, w


def _grads(fn, h, W, labels, w, scale=0.37):
    h.grad = W.grad = None
    loss, ce = fn(h, W, labels, w)
    (loss * scale).backward()                      # a non-unit upstream gradient, as the trainer's 1/den
    return loss.detach(), ce, h.grad.clone(), W.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_matches_reference_values_and_gradients(chunk):
    h, W, labels, w = _inputs()
    ref = _grads(linear_cross_entropy_reference, h, W, labels, w)
    got = _grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, W, labels, w)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    assert not got[1].requires_grad and got[1].dtype == torch.float32


def test_large_logits_stay_finite_and_bf16_follows_the_reference():
    h, W, labels, w = _inputs()
    with torch.no_grad():
        W.mul_(200.0)                              # logits ~1e3: a naive exp overflows
    ref = _grads(linear_cross_entropy_reference, h, W, labels, w)
    got = _grads(linear_cross_entropy, h, W, labels, w)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-4)
    hb, Wb, labels, w = _inputs(dtype=torch.bfloat16)
    ref = _grads(linear_cross_entropy_reference, hb, Wb, labels, w)
    got = _grads(lambda *a: linear_cross_entropy(*a, chunk=8), hb, Wb, labels, w)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-4)       # fp32 softmax of the same bf16 logits
    torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=2e-2, atol=2e-3)


def test_no_grad_and_bad_arguments():
    h, W, labels, w = _inputs()
    with torch.no_grad():
        loss, ce = linear_cross_entropy(h, W, labels, w)
    assert torch.allclose(loss, linear_cross_entropy_reference(h, W, labels, w)[0].detach(), atol=1e-5)
    with pytest.raises(ValueError, match=r"labels: every label must lie in \[0, 50\)"):
        linear_cross_entropy(h, W, torch.full_like(labels, -100), w)
    with pytest.raises(ValueError, match=r"hidden: expected \[N, D\]"):
        linear_cross_entropy(h, W[:, :3], labels, w)
    with pytest.raises(ValueError, match=r"token_weights: expected \[N\]"):
        linear_cross_entropy(h, W, labels, w[:3])
    with pytest.raises(ValueError, match=r"chunk: expected rows per chunk >= 1"):
        linear_cross_entropy(h, W, labels, w, chunk=0)


@pytest.mark.parametrize("sparse,tied", [(False, False), (True, False), (False, True)])
def test_model_training_loss_equals_the_logits_path_for_every_objective(sparse, tied):
    v = Vocab(64, {"image": 32, "audio": 32})
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      vocab_size=v.size, modality_sparse=sparse, tie_embeddings=tied,
                      num_modalities=len(v.modality_names) if sparse else 0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(v.size, (3, 40), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 28:] = False                          # padding: no labels there
    mods = v.modality_table()[ids]
    for kind in ("ar", "masked", "hybrid"):
        obj = build_objective(ObjectiveConfig(kind=kind, loss_weights={"image": 0.5}, no_loss=["special"]), v)
        p = obj.prepare(ids, mods, valid, torch.Generator().manual_seed(1))
        model.zero_grad()
        ref, rs, rc = loss_and_report(model(p.input_ids, p.modality_ids, p.attn_mask), p, obj.weights)
        ref.backward()
        ref_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        model.zero_grad()
        got, gs, gc = model_loss_and_report(model, p, obj.weights)
        got.backward()
        torch.testing.assert_close(got.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gs, rs, atol=1e-4, rtol=1e-5)
        assert torch.equal(gc, rc) and gs[obj.names.index("special")] > 0    # no_loss still reported
        for n, q in model.named_parameters():
            torch.testing.assert_close(q.grad, ref_grads[n], atol=1e-6, rtol=1e-4, msg=f"{kind} {n}")
    with pytest.raises(ValueError, match=r"labels: expected \[B, L\]"):
        model.loss(ids, p.labels[:, :5], modality_ids=mods)
    logits = model(ids, mods)                      # the logits path (export, generation) is unchanged
    assert logits.shape == (3, 40, v.size)
