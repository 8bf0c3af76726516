"""Output projection + cross-entropy in row chunks, never holding the [tokens, vocab] logits.

    loss, ce = linear_cross_entropy(hidden [N, D], weight [V, D], labels [N], token_weights [N])
    loss = sum_i token_weights[i] * ce[i]   (differentiable in hidden and weight)
    ce   = per-row cross-entropy, fp32, detached (for per-modality reports)

Training a small-dimension model over a large vocabulary spends much of its step on the logits:
writing [N, V] floats, log-softmax over them, the loss gradient (a zero fill, a scatter, the
log-softmax backward) and the copies of slicing and upcasting, each a pass through memory far
larger than the cache. Here each chunk of rows computes its logits, softmax and logit gradient
(softmax - one_hot, times the row's weight) in place in one buffer, and folds it at once into
grad_hidden and grad_weight. So the gradients are finished in the forward pass (the
loss is a scalar sum, so backward only scales them by the incoming gradient): no logits are kept
for backward and the output projection is not recomputed.

The matmuls run in the inputs' dtype and the softmax in fp32, as `F.linear(...).float()` followed
by `F.cross_entropy` does; grad_weight accumulates in fp32 across chunks when the weight is
bf16/fp16, so chunking does not add roundings. `linear_cross_entropy_reference` is that plain
composition, the definition the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ~8M fp32 logits (32 MB) per chunk bounds the memory for large vocabularies and batches; smaller
# chunks (that stay in L2) were ~15% faster with one thread on an idle core but up to 2x slower with
# two OpenMP threads on a busy machine, where every extra parallel region waits for a descheduled
# thread (measured on the 2-core CPU, docs/benchmarks.md ## train). At the bench size (2048 x 4096)
# this is one chunk, still without keeping logits or a separate backward pass.
CHUNK_ELEMENTS = 1 << 23


def _check_shapes(hidden, weight, labels, token_weights):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden: expected [N, D] with weight [V, D], got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels: expected integer [N] = [{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if token_weights.shape != hidden.shape[:1]:
        raise ValueError(f"token_weights: expected [N] = [{hidden.shape[0]}], got {tuple(token_weights.shape)}")


def _check(hidden, weight, labels, token_weights):
    _check_shapes(hidden, weight, labels, token_weights)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels: every label must lie in [0, {weight.shape[0]}) (drop ignored rows first), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")


def _chunked(hidden, weight, labels, tw, chunk: int, want_h: bool, want_w: bool):
    """The chunk loop: (per-row CE fp32 [N], grad_hidden of sum(tw * ce) or None, grad_weight (fp32
    for a bf16/fp16 weight) or None). Every label must be a class index."""
    N = hidden.shape[0]
    labels = labels.long()
    ce = torch.empty(N, dtype=torch.float32, device=hidden.device)
    g_hidden = torch.empty_like(hidden) if want_h else None
    acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    g_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
    wt = weight.t()
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h, lab = hidden[s:e], labels[s:e, None]
        logits = torch.mm(h, wt).float()
        picked = logits.gather(1, lab).squeeze(1)
        # one pass each, in place in the chunk's buffer: shift, exp, row sums -> CE and softmax
        m = logits.amax(dim=1, keepdim=True)
        g = logits.sub_(m).exp_()
        sums = g.sum(dim=1)
        ce[s:e] = sums.log() + m.squeeze(1) - picked
        if not (want_h or want_w):
            continue
        # d(w * ce)/d logits = w * (softmax - one_hot)
        w = tw[s:e]
        g.mul_((w / sums)[:, None])
        g.scatter_add_(1, lab, -w[:, None])
        g = g.to(hidden.dtype)
        if want_h:
            torch.mm(g, weight, out=g_hidden[s:e])
        if want_w:
            g_weight.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
    return ce, g_hidden, g_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk):
        tw = token_weights.float()
        ce, g_hidden, g_weight = _chunked(hidden, weight, labels, tw, chunk,
                                          ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(g_hidden, g_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * tw).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        g_hidden, g_weight = ctx.saved_tensors
        gh = None if g_hidden is None else g_hidden * grad_loss.to(g_hidden.dtype)
        gw = None if g_weight is None else (g_weight * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         token_weights: torch.Tensor | None = None, chunk: int | None = None):
    """(sum_i w_i * CE(hidden_i @ weight.T, labels_i), per-row CE [N] fp32 detached); see the module doc.
    Every label must be a class index (drop ignored rows before calling)."""
    if token_weights is None:
        token_weights = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _check(hidden, weight, labels, token_weights)
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    if chunk < 1:
        raise ValueError(f"chunk: expected rows per chunk >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, token_weights, int(chunk))


def linear_cross_entropy_reference(hidden, weight, labels, token_weights=None):
    """The plain composition: full logits, then F.cross_entropy per row."""
    if token_weights is None:
        token_weights = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _check(hidden, weight, labels, token_weights)
    ce = F.cross_entropy(F.linear(hidden, weight).float(), labels.long(), reduction="none")
    return (ce * token_weights.float()).sum(), ce.detach()


# The training loss head (Transformer.loss) as one opaque op, so torch.compile traces the model to the
# loss without a graph break: the labelled-row selection has a data-dependent size, which Dynamo
# cannot trace, but inside a custom op it runs eagerly, exactly as without compile, while the graph
# sees only static shapes (the fake below). So compiled and eager training compute the same rows in
# the same chunks, and compile spends nothing on unlabelled positions either. The gradients come out
# of the forward (as in _LinearCrossEntropy) and backward scales them by the incoming gradient.
IGNORE_INDEX = -100


@torch.library.custom_op("mmfm_py::masked_linear_cross_entropy", mutates_args=())
def _masked_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
               chunk: int, want_hidden: bool, want_weight: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    N = hidden.shape[0]
    keep = labels != IGNORE_INDEX
    rows = None if bool(keep.all()) else torch.nonzero(keep).squeeze(1)
    pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    h, lab, tw = pick(hidden), pick(labels), pick(token_weights).float()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= weight.shape[0]):
        raise ValueError(f"labels: every label must lie in [0, {weight.shape[0]}) or be {IGNORE_INDEX} "
                         f"(no loss), got [{int(lab.min())}, {int(lab.max())}]")
    ce, gh, gw = _chunked(h, weight, lab, tw, chunk, want_hidden, want_weight)
    loss = (ce * tw).sum()
    if rows is not None:   # back to all N rows: unlabelled ones have CE 0 and no gradient
        ce = torch.zeros(N, dtype=ce.dtype, device=ce.device).index_copy_(0, rows, ce)
        if gh is not None:
            gh = torch.zeros_like(hidden).index_copy_(0, rows, gh)
    # a custom op returns tensors only: an unwanted gradient is an empty one
    return loss, ce, hidden.new_empty(0) if gh is None else gh, weight.new_empty(0) if gw is None else gw


@_masked_op.register_fake
def _(hidden, weight, labels, token_weights, chunk, want_hidden, want_weight):
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    N = hidden.shape[0]
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((N,), dtype=torch.float32),
            torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=acc) if want_weight else weight.new_empty(0))


def _masked_setup(ctx, inputs, output):
    ctx.want = (inputs[5], inputs[6])
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[2], output[3])


def _masked_backward(ctx, grad_loss, grad_ce, grad_gh, grad_gw):
    g_hidden, g_weight = ctx.saved_tensors
    gh = g_hidden * grad_loss.to(g_hidden.dtype) if ctx.want[0] else None
    gw = (g_weight * grad_loss).to(ctx.weight_dtype) if ctx.want[1] else None
    return gh, gw, None, None, None, None, None


_masked_op.register_autograd(_masked_backward, setup_context=_masked_setup)


def masked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                token_weights: torch.Tensor | None = None, chunk: int | None = None):
    """linear_cross_entropy where a label may be IGNORE_INDEX (-100): that row gets CE 0 and no loss
    or gradient, and no logits are computed for it. (loss, per-row CE [N] fp32 detached). Traces under
    torch.compile(fullgraph=True) with static shapes (see above)."""
    if token_weights is None:
        token_weights = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _check_shapes(hidden, weight, labels, token_weights)   # no label range check: -100 is allowed
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    if chunk < 1:
        raise ValueError(f"chunk: expected rows per chunk >= 1, got {chunk}")
    grad = torch.is_grad_enabled()
    loss, ce, _, _ = _masked_op(hidden, weight, labels, token_weights, int(chunk),
                                grad and hidden.requires_grad, grad and weight.requires_grad)
    return loss, ce.detach()
