"""Fused logits processing, sampling and lossless speculative verification.

`sample` turns a batch of logits into one token per row in a few passes over the vocabulary,
without sorting it; `processed_probs` returns the distribution it draws from; `verify_chain`
and `verify_multi_draft` verify speculative drafts so that the output distribution is exactly
the target's. Each runs the compiled kernel (torch.ops.mmfm.*, csrc/sampling) or, when the
extension is absent, the pure-torch sort-based reference defined beside it (`*_reference`),
which the tests compare against. Details and costs: docs/ops_sampling.md.

Processing order of one row of logits z (every parameter is a scalar or a tensor [B]):

  1. penalties from `history` [B, L] (entries < 0 are padding): for every token t seen
     c_t > 0 times, z_t <- z_t < 0 ? z_t * r : z_t / r  (repetition_penalty r, as in
     transformers), then z_t <- z_t - frequency_penalty * c_t - presence_penalty;
  2. allowed tokens: z_t <- -inf outside allowed_range [lo, hi) and where allowed_mask is False;
  3. temperature: 0 means greedy (the first index of max z; steps 4-7 are skipped), otherwise
     s = z * fp32(1 / temperature); p = softmax(s);
  4. top_k: keep s >= the k-th largest s (ties with it are kept); 0 or >= V is off;
  5. top_p: keep s >= v, where v is the largest value whose superlevel set {s >= v} holds at
     least top_p of the remaining mass (the smallest head of the sorted distribution whose
     mass reaches top_p, extended to ties); 1 is off, 0 keeps the maximum (and its ties);
  6. min_p: keep p >= min_p * p_max, computed as s >= fp32(double(max s) + log(min_p)); 0 is off;
  7. typical_p (locally typical sampling): on the renormalised q, H = -sum q log q and
     |-log q_i - H| = |s_i - mu| with mu = sum q_i s_i; keep the tokens of smallest |s - mu|
     whose mass reaches typical_p (ties included); 1 is off;
  8. renormalise and draw by inverse CDF in token order with a uniform from Philox4x32-10
     keyed by (seed, offset, row): the same seed, offset and inputs give the same tokens on any
     thread count.

Every kept set is defined on fp32 values exactly as written above, so the compiled op and the
reference keep the same tokens (mass thresholds can differ only when a cumulative sum lies
within rounding of top_p / typical_p). Rows with NaN or +inf logits, or with no token left
after the mask, raise ValueError naming the argument and the row; no op ever returns a token
outside [0, V).
"""
from __future__ import annotations

import functools
import math
from numbers import Integral, Real

import torch

from mmfm._ext import compiled

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
PARAM_NAMES = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")
PARAM_DEFAULTS = (1.0, 0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0)
_RULES = {
    "temperature": ("a finite number >= 0 (0 = greedy)", lambda x: math.isfinite(x) and x >= 0),
    "top_k": ("an integer >= 0 (0 = off)", lambda x: math.isfinite(x) and x >= 0 and float(x).is_integer()),
    "top_p": ("in [0, 1] (1 = off)", lambda x: 0 <= x <= 1),
    "min_p": ("in [0, 1] (0 = off)", lambda x: 0 <= x <= 1),
    "typical_p": ("in [0, 1] (1 = off)", lambda x: 0 <= x <= 1),
    "repetition_penalty": ("a finite number > 0 (1 = off)", lambda x: math.isfinite(x) and x > 0),
    "presence_penalty": ("finite (0 = off)", math.isfinite),
    "frequency_penalty": ("finite (0 = off)", math.isfinite),
}
_F32_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------- validation
def _tensor_arg(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")


def _logits_arg(logits, op: str, name: str = "logits") -> None:
    _tensor_arg(logits, op, name)
    if logits.dtype not in FLOAT_TYPES:
        raise TypeError(f"mmfm.{op}: argument '{name}' must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"mmfm.{op}: argument '{name}' must have shape [B, V] (2 dims), got {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"mmfm.{op}: argument '{name}' has an empty vocabulary (shape {tuple(logits.shape)})")


def _param_column(value, name: str, B: int, V: int, device) -> tuple[float | None, torch.Tensor | None]:
    """A parameter as a Python float (scalar) or an fp32 tensor [B] on `device`."""
    op = "sample"
    rule, ok = _RULES[name]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.dim() != 1 or value.shape[0] != B:
                raise ValueError(f"mmfm.{op}: argument '{name}' must be a number or a tensor of shape [B={B}], "
                                 f"got shape {tuple(value.shape)}")
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"mmfm.{op}: argument '{name}' must hold real numbers, got {value.dtype}")
            if name == "top_k":
                value = value.clamp(max=V)  # k >= V is off; keeps the fp32 column exact
            return None, value.detach().to(device=device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a number or a tensor [B], got {type(value).__name__}")
    x = float(value)
    if not ok(x) or abs(x) > _F32_MAX:
        raise ValueError(f"mmfm.{op}: argument '{name}' must be {rule}, got {value}")
    if name == "top_k":
        x = float(min(int(x), V))
    return x, None


def pack_params(B: int, V: int, device, **params) -> torch.Tensor:
    """The per-row parameter matrix [B, 8] (fp32) of torch.ops.mmfm.sample / processed_probs.

    Columns: temperature, top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty,
    frequency_penalty. Each keyword is a number or a tensor [B]; missing ones take their
    neutral default. Scalars are validated here; tensor values by the kernel (or the
    reference path), with errors naming the parameter.
    """
    unknown = set(params) - set(PARAM_NAMES)
    if unknown:
        raise TypeError(f"mmfm.sample: unknown parameter(s) {sorted(unknown)}; known: {list(PARAM_NAMES)}")
    values = tuple(params.get(n, d) for n, d in zip(PARAM_NAMES, PARAM_DEFAULTS))
    if all(type(v) in (int, float) for v in values):  # the common case: one cached row per setting
        return _scalar_params(values, V, str(device)).expand(B, len(PARAM_NAMES))
    scalars, columns = [], {}
    for name, default in zip(PARAM_NAMES, PARAM_DEFAULTS):
        x, col = _param_column(params.get(name, default), name, B, V, device)
        scalars.append(x)
        if col is not None:
            columns[name] = col
    if not columns:
        return torch.tensor([scalars], dtype=torch.float32).to(device).expand(B, len(PARAM_NAMES))
    cols = [columns[n] if n in columns else torch.full((B,), x, dtype=torch.float32, device=device)
            for n, x in zip(PARAM_NAMES, scalars)]
    return torch.stack(cols, dim=1)


@functools.lru_cache(maxsize=256)
def _scalar_params(values: tuple, V: int, device: str) -> torch.Tensor:
    """[1, 8] parameter row for Python-number parameters (validated; read-only, shared)."""
    row = [_param_column(v, n, 1, V, device)[0] for n, v in zip(PARAM_NAMES, values)]
    return torch.tensor([row], dtype=torch.float32, device=device)


def _check_param_values(params: torch.Tensor, op: str) -> None:
    """Reference-path check of every row's parameters (the kernels do this while they run)."""
    P = params.detach().double().cpu()
    for c, name in enumerate(PARAM_NAMES):
        rule, ok = _RULES[name]
        col = P[:, c].tolist()
        for row, x in enumerate(col):
            if not ok(x):
                raise ValueError(f"mmfm.{op}: argument '{name}' must be {rule}, got {x} for row {row}")


def _range_arg(allowed_range, B: int, V: int, device, op: str) -> torch.Tensor | None:
    if allowed_range is None:
        return None
    if not isinstance(allowed_range, torch.Tensor):
        if len(allowed_range) != 2:
            raise ValueError(f"mmfm.{op}: argument 'allowed_range' must be (lo, hi) or a tensor [B, 2], got {allowed_range}")
        lo, hi = (int(v) for v in allowed_range)
        if not 0 <= lo < hi <= V:
            raise ValueError(f"mmfm.{op}: argument 'allowed_range' is [{lo}, {hi}); it must satisfy 0 <= lo < hi <= V={V}")
        return torch.tensor([[lo, hi]], dtype=torch.int64).to(device).expand(B, 2)
    if allowed_range.dtype in (torch.bool,) or allowed_range.is_floating_point() or allowed_range.is_complex():
        raise TypeError(f"mmfm.{op}: argument 'allowed_range' must hold integers, got {allowed_range.dtype}")
    r = allowed_range.to(device=device, dtype=torch.int64)
    if r.dim() == 1 and r.shape[0] == 2:
        r = r[None].expand(B, 2)
    if r.dim() != 2 or r.shape[0] != B or r.shape[1] != 2:
        raise ValueError(f"mmfm.{op}: argument 'allowed_range' must have shape [B={B}, 2] (lo, hi), got "
                         f"{tuple(allowed_range.shape)}")
    return r


def _mask_arg(mask, B: int, V: int, device, op: str) -> torch.Tensor | None:
    if mask is None:
        return None
    _tensor_arg(mask, op, "allowed_mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mmfm.{op}: argument 'allowed_mask' must be bool (True = allowed), got {mask.dtype}")
    if mask.dim() == 1 and mask.shape[0] == V:
        mask = mask[None].expand(B, V)
    if tuple(mask.shape) != (B, V):
        raise ValueError(f"mmfm.{op}: argument 'allowed_mask' must have shape [B, V] = [{B}, {V}] or [V], got "
                         f"{tuple(mask.shape)}")
    return mask.to(device)


def _history_arg(history, B: int, device, op: str) -> torch.Tensor | None:
    if history is None:
        return None
    _tensor_arg(history, op, "history")
    if history.dtype == torch.bool or history.is_floating_point() or history.is_complex():
        raise TypeError(f"mmfm.{op}: argument 'history' must hold integer token ids, got {history.dtype}")
    if history.dim() != 2 or history.shape[0] != B:
        raise ValueError(f"mmfm.{op}: argument 'history' must have shape [B={B}, L], got {tuple(history.shape)}")
    return history.to(device=device, dtype=torch.int64)


def _seed_offset(generator, seed, offset, device) -> tuple[int, int]:
    """(seed, offset) for the Philox stream: from `seed`, else drawn from `generator` (or the
    default generator of the device, so torch.manual_seed makes runs repeat)."""
    if seed is not None and generator is not None:
        raise ValueError("mmfm.sample: pass either 'seed' or 'generator', not both")
    if not isinstance(offset, Integral) or isinstance(offset, bool):
        raise TypeError(f"mmfm.sample: argument 'offset' must be an int, got {type(offset).__name__}")
    if seed is None:
        gdev = generator.device if generator is not None else torch.device(device)
        if gdev.type not in ("cpu", "cuda"):
            gdev = torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev).item())
    elif not isinstance(seed, Integral) or isinstance(seed, bool):
        raise TypeError(f"mmfm.sample: argument 'seed' must be an int, got {type(seed).__name__}")

    def to_i64(x: int) -> int:
        x = int(x) & (2**64 - 1)
        return x - 2**64 if x >= 2**63 else x

    return to_i64(seed), to_i64(offset)


def _row_offsets_arg(offset: torch.Tensor, B: int, device, op: str) -> torch.Tensor:
    """A per-row offset tensor -> int64 [B] on the logits' device; names the argument on error."""
    if offset.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"mmfm.{op}: argument 'offset' as a tensor must hold integer offsets, got {offset.dtype}")
    if offset.dim() != 1 or offset.shape[0] != B:
        raise ValueError(f"mmfm.{op}: argument 'offset' as a tensor must have shape [B={B}] (one offset per row), "
                         f"got {tuple(offset.shape)}")
    return offset.to(device=device, dtype=torch.int64).contiguous()


def _reference_generator(seed: int, offset: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) & (2**63 - 1))
    return g


def _check_logits_values(z: torch.Tensor, op: str) -> None:
    bad = ~(z < math.inf)  # NaN or +inf
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(f"mmfm.{op}: argument 'logits' has NaN or +inf in row {row}; logits must be finite, or -inf "
                         "for excluded tokens")


# --------------------------------------------------------------------- reference processing
def _reference_keep(logits, params, allowed_range=None, allowed_mask=None, history=None, op="processed_probs"):
    """Sort-based reference: (s fp32 [B, V], keep [B, V] bool, greedy [B] bool, argmax [B])."""
    z = logits.detach().float().clone()
    B, V = z.shape
    dev = z.device
    P = params.to(device=dev, dtype=torch.float32)
    T, k, top_p, min_p, typ, rep, pres, freq = (P[:, c] for c in range(len(PARAM_NAMES)))
    _check_logits_values(z, op)
    if history is not None and history.shape[1] > 0:
        if bool((history >= V).any()):
            row = int((history >= V).any(1).nonzero()[0, 0])
            raise ValueError(f"mmfm.{op}: argument 'history' has a token id >= V={V} in row {row}; use negative ids "
                             "for padding")
        valid = history >= 0
        counts = torch.zeros(B, V, dtype=torch.int64, device=dev).scatter_add_(1, history.clamp(min=0),
                                                                               valid.to(torch.int64))
        seen = counts > 0
        pen = torch.where(z < 0, z * rep[:, None], z / rep[:, None])
        pen = pen - freq[:, None] * counts.float()
        pen = pen - pres[:, None]
        z = torch.where(seen, pen, z)
    allowed = torch.ones(B, V, dtype=torch.bool, device=dev)
    if allowed_range is not None:
        r = allowed_range.to(dev)
        lo, hi = r[:, 0], r[:, 1]
        bad = ~((lo >= 0) & (lo < hi) & (hi <= V))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"mmfm.{op}: argument 'allowed_range' row {row} is [{int(lo[row])}, {int(hi[row])}); it "
                             f"must satisfy 0 <= lo < hi <= V={V}")
        ar = torch.arange(V, device=dev)
        allowed &= (ar[None] >= lo[:, None]) & (ar[None] < hi[:, None])
    if allowed_mask is not None:
        allowed &= allowed_mask.to(dev)
    z = z.masked_fill(~allowed, -math.inf)
    greedy = T == 0
    inv = 1.0 / torch.where(greedy, torch.ones_like(T), T)  # fp32 reciprocal, as the kernel
    s = z * inv[:, None]
    if bool((s == math.inf).any()):
        row = int((s == math.inf).any(1).nonzero()[0, 0])
        raise ValueError(f"mmfm.{op}: row {row} of 'logits' overflowed to +inf after the penalties and 'temperature' = "
                         f"{float(T[row])}; use temperature=0 for greedy decoding")
    keep = s > -math.inf
    nfin = keep.sum(1)
    if bool((nfin == 0).any()):
        row = int((nfin == 0).nonzero()[0, 0])
        raise ValueError(f"mmfm.{op}: row {row} of 'logits' has no token left to sample: every logit is -inf after the "
                         "penalties and the allowed tokens ('allowed_range' / 'allowed_mask')")
    argmax = s.argmax(1)  # first index of the maximum
    # top-k: every token >= the k-th largest value (ties kept)
    kk = k.long()
    on = (kk > 0) & (kk < nfin)
    if bool(on.any()):
        kth = s.sort(1, descending=True).values.gather(1, (kk.clamp(1, V) - 1)[:, None])
        keep &= ~on[:, None] | (s >= kth)
    # top-p: the largest v whose superlevel set {s >= v} holds >= top_p of the kept mass
    on = top_p < 1
    if bool(on.any()):
        sk = s.masked_fill(~keep, -math.inf)
        ss = sk.sort(1, descending=True).values
        cum = torch.softmax(ss.double(), 1).cumsum(1)
        idx = (cum < top_p.double()[:, None]).sum(1).clamp(max=V - 1)
        keep &= ~on[:, None] | (s >= ss.gather(1, idx[:, None]))
    # min-p: p >= min_p * p_max  <=>  s >= max s + log(min_p)
    on = min_p > 0
    if bool(on.any()):
        m = s.masked_fill(~keep, -math.inf).max(1).values
        thr = (m.double() + torch.log(min_p.double())).float()
        keep &= ~on[:, None] | (s >= thr[:, None])
    # typical: smallest |s - mu| first, until the mass reaches typical_p (ties kept)
    on = typ < 1
    if bool(on.any()):
        sk = s.masked_fill(~keep, -math.inf)
        q = torch.softmax(sk.double(), 1)
        mu = (q * sk.double().masked_fill(~keep, 0.0)).sum(1).float()
        key = (-(s - mu[:, None]).abs()).masked_fill(~keep, -math.inf)
        sorted_key, order = key.sort(1, descending=True)
        cum = q.gather(1, order).cumsum(1)
        idx = (cum < typ.double()[:, None]).sum(1).clamp(max=V - 1)
        keep &= ~on[:, None] | (key >= sorted_key.gather(1, idx[:, None]))
    return s, keep, greedy, argmax


def processed_probs_reference(logits: torch.Tensor, *, allowed_range=None, allowed_mask=None, history=None,
                              **params) -> torch.Tensor:
    """Pure-torch, sort-based version of `processed_probs` (same arguments, same order)."""
    B, V = logits.shape
    P = pack_params(B, V, logits.device, **params)
    _check_param_values(P, "processed_probs")
    r = _range_arg(allowed_range, B, V, logits.device, "processed_probs")
    mk = _mask_arg(allowed_mask, B, V, logits.device, "processed_probs")
    h = _history_arg(history, B, logits.device, "processed_probs")
    return _reference_probs(logits, P, r, mk, h, "processed_probs")


def _reference_probs(logits, P, r, mk, h, op) -> torch.Tensor:
    s, keep, greedy, argmax = _reference_keep(logits, P, r, mk, h, op)
    probs = torch.softmax(s.masked_fill(~keep, -math.inf), 1)
    onehot = torch.nn.functional.one_hot(argmax, s.shape[1]).float()
    return torch.where(greedy[:, None], onehot, probs)


def sample_reference(logits: torch.Tensor, *, allowed_range=None, allowed_mask=None, history=None,
                     generator: torch.Generator | None = None, return_probs: bool = False, **params):
    """`processed_probs_reference` followed by torch.multinomial (draws differ from the kernel's
    Philox stream; the distribution is the same)."""
    probs = processed_probs_reference(logits, allowed_range=allowed_range, allowed_mask=allowed_mask, history=history,
                                      **params)
    return _draw_reference(probs, generator, return_probs)


def _draw_reference(probs, generator, return_probs):
    if probs.shape[0] == 0:
        tokens = torch.empty(0, dtype=torch.int64, device=probs.device)
    else:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if return_probs:
        return tokens, probs.gather(1, tokens[:, None]).squeeze(1)
    return tokens


# ------------------------------------------------------------------------------------- ops
def _prepare(op, logits, allowed_range, allowed_mask, history, params):
    _logits_arg(logits, op)
    B, V = logits.shape
    dev = logits.device
    P = pack_params(B, V, dev, **params)
    r = _range_arg(allowed_range, B, V, dev, op)
    mk = _mask_arg(allowed_mask, B, V, dev, op)
    h = _history_arg(history, B, dev, op)
    return P, r, mk, h


# sample()'s checked calls: (scalar settings, logits shape, dtype, device) -> the packed parameter
# rows. A decode loop calls sample once per step with the same settings and shapes, and the
# argument checks and packing (a dozen small Python calls) measured ~7% of the plain decode loop
# on the byte-level bench model, where a step is ~0.45 ms; calls seen before skip them (a
# constraint tensor is still checked, by its dtype, shape and device: its values the kernel checks).
_CHECKED: dict = {}
_I64 = 2**63


def _as_checked(t, dtype, logits: torch.Tensor, width: int) -> bool:
    """Whether a constraint tensor is one the checked path passes to the op unchanged: `dtype`,
    [B, width], on the logits' device (Constraints keeps its range and mask so)."""
    return (type(t) is torch.Tensor and t.dtype == dtype and t.dim() == 2 and t.shape[0] == logits.shape[0]
            and t.shape[1] == width and t.device == logits.device)


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
           allowed_range=None, allowed_mask=None, history=None, repetition_penalty=1.0, presence_penalty=0.0,
           frequency_penalty=0.0, generator: torch.Generator | None = None, seed: int | None = None,
           offset: int | torch.Tensor = 0, return_probs: bool = False):
    """One token per row of logits [B, V] (fp32, fp16 or bf16; computed in fp32).

    Parameters are numbers or tensors [B] (per row); the processing order is in the module
    docstring: penalties -> allowed tokens -> temperature (0 = greedy) -> top_k -> top_p ->
    min_p -> typical_p -> renormalise -> draw.

    allowed_range: (lo, hi) or an int tensor [B, 2]: only tokens lo <= t < hi (e.g. after
    `<image>` only image tokens). allowed_mask: bool [B, V] or [V], True = allowed.
    history: int64 [B, L] of previous tokens (negative = padding) for the penalties.
    seed (+ offset, e.g. the decoding step) makes the draw a pure function of the inputs;
    otherwise a seed is drawn from `generator` or from torch's default generator. offset as an
    int: row r draws from the stream (seed, offset, row r); as an int64 tensor [B]: row r draws
    from (seed, offset[r], row 0), the stream of a one-row call with offset=offset[r], so rows
    that stand for positions of one sequence (a draft tree's nodes, keyed by their position)
    draw exactly what one-token steps at those positions would (speculative.py).
    Returns tokens int64 [B], and with return_probs=True also the probability of each token
    under the processed distribution (fp32 [B]; 1 for greedy rows).

    Algorithm (compiled): per row, one pass loads, masks, penalises and scales the logits and
    finds max / min; top-k is a streaming threshold filter (blocks below the running k-th value
    are skipped) and the survivors are gathered; top-p and typical find their threshold by
    weighted multi-pivot bisection (15 pivots per pass, the bracketing interval compacted after
    each pass, finished by sorting <= 256 candidates); min-p is a logit threshold; the draw sums
    the kept weights per tile of 256 and scans one tile. O(V) per row, no sort of V;
    rows are spread over OpenMP threads (CPU) or thread blocks (CUDA).
    """
    plain = (history is None and generator is None and not return_probs and type(seed) is int
             and type(offset) is int and type(logits) is torch.Tensor)
    if plain:   # a decode loop's call: the arguments were checked when these settings and shapes were first seen
        settings = (temperature, top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty)
        P = _CHECKED.get((settings, logits.shape, logits.dtype, logits.device))
        if (P is not None and 0 <= seed < _I64 and 0 <= offset < _I64
                and (allowed_range is None or _as_checked(allowed_range, torch.int64, logits, 2))
                and (allowed_mask is None or _as_checked(allowed_mask, torch.bool, logits, logits.shape[1]))
                and compiled(logits)):
            return torch.ops.mmfm.sample(logits.detach() if logits.requires_grad else logits, P, allowed_range,
                                         allowed_mask, None, seed, offset, None)[0]
    op = "sample"
    P, r, mk, h = _prepare(op, logits, allowed_range, allowed_mask, history, dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty))
    row_offsets = None
    if isinstance(offset, torch.Tensor):
        row_offsets = _row_offsets_arg(offset, logits.shape[0], logits.device, op)
        offset = 0
    s, o = _seed_offset(generator, seed, offset, logits.device)
    if compiled(logits):
        tokens, probs = torch.ops.mmfm.sample(logits.detach(), P, r, mk, h, s, o, row_offsets)
        if plain and all(type(v) in (int, float) for v in settings):
            if len(_CHECKED) >= 256:
                _CHECKED.clear()
            _CHECKED[settings, logits.shape, logits.dtype, logits.device] = P
        return (tokens, probs) if return_probs else tokens
    _check_param_values(P, op)
    probs = _reference_probs(logits, P, r, mk, h, op)
    if row_offsets is None:
        return _draw_reference(probs, _reference_generator(s, o, logits.device), return_probs)
    # one stream per row, the one a one-row call with that offset uses
    drawn = [_draw_reference(probs[i:i + 1], _reference_generator(s, off, logits.device), True)
             for i, off in enumerate(row_offsets.tolist())]
    tokens = torch.cat([t for t, _ in drawn]) if drawn else torch.empty(0, dtype=torch.int64, device=logits.device)
    if return_probs:
        return tokens, (torch.cat([q for _, q in drawn]) if drawn else probs.new_empty(0))
    return tokens


def processed_probs(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                    allowed_range=None, allowed_mask=None, history=None, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0) -> torch.Tensor:
    """The distribution `sample` draws from, fp32 [B, V] (zero outside the kept set; one-hot at
    the argmax for temperature 0). Same arguments and processing as `sample`."""
    op = "processed_probs"
    P, r, mk, h = _prepare(op, logits, allowed_range, allowed_mask, history, dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty))
    if compiled(logits):
        return torch.ops.mmfm.processed_probs(logits.detach(), P, r, mk, h)
    _check_param_values(P, op)
    return _reference_probs(logits, P, r, mk, h, op)


# ----------------------------------------------------------------- speculative verification
def _probs_arg(t, op, name, dims, shape):
    _tensor_arg(t, op, name)
    if t.dtype not in FLOAT_TYPES:
        raise TypeError(f"mmfm.{op}: argument '{name}' must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"mmfm.{op}: argument '{name}' must have shape {shape} ({dims} dims), got {tuple(t.shape)}")


def _ids_arg(t, op, name, shape):
    _tensor_arg(t, op, name)
    if t.dtype != torch.int64:
        raise TypeError(f"mmfm.{op}: argument '{name}' must be int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"mmfm.{op}: argument '{name}' must have shape {list(shape)}, got {tuple(t.shape)}")


def _check_probs_values(op, *named):
    for name, t in named:
        bad = ~((t >= 0) & (t < math.inf))
        if bool(bad.any()):
            row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0])
            raise ValueError(f"mmfm.{op}: arguments 'target_probs' / 'draft_probs' have NaN, inf or negative values in "
                             f"row {row} ('{name}'); they must hold probabilities")


def _check_ids(op, name, ids, V):
    bad = (ids < 0) | (ids >= V)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(f"mmfm.{op}: argument '{name}' has a token id outside [0, V={V}) in row {row}")


def verify_chain_reference(target_probs, draft_probs, draft_tokens, generator=None):
    """Row by row, position by position: accept x with probability min(1, p(x)/q(x)); on the
    first rejection draw from norm(max(0, p - q)) (p if that is empty); after G acceptances
    draw from p_G."""
    B, G1, V = target_probs.shape
    G = G1 - 1
    p, q = target_probs.double(), draft_probs.double()
    accepted = torch.empty(B, dtype=torch.int64, device=p.device)
    nxt = torch.empty(B, dtype=torch.int64, device=p.device)
    for b in range(B):
        for j in range(G):
            x = int(draft_tokens[b, j])
            u = float(torch.rand((), dtype=torch.float64, generator=generator, device=p.device))
            if u * float(q[b, j, x]) < float(p[b, j, x]):
                continue
            r = (p[b, j] - q[b, j]).clamp(min=0)
            if not float(r.sum()) > 0:
                r = p[b, j]
            accepted[b], nxt[b] = j, torch.multinomial(r, 1, generator=generator)[0]
            break
        else:
            accepted[b], nxt[b] = G, torch.multinomial(p[b, G], 1, generator=generator)[0]
    return accepted, nxt


def verify_chain(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor, *,
                 generator: torch.Generator | None = None, seed: int | None = None, offset: int = 0):
    """Lossless chain speculative verification (Leviathan et al.; Chen et al.).

    target_probs p [B, G+1, V], draft_probs q [B, G, V] (same dtype; rows should sum to 1, e.g.
    outputs of `processed_probs`), draft_tokens [B, G] int64 drawn from q.
    For j = 0..G-1 the draft x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at
    the first rejection the next token is drawn from norm(max(0, p_j - q_j)) and the row stops;
    if all G are accepted it is drawn from p_G. The tokens emitted (accepted drafts, then the
    next token) are distributed exactly as sampling from p step by step.
    Returns (accepted [B] int64 in 0..G, next_token [B] int64).

    Cost: O(G) for the acceptance tests plus one pass over V (residual or bonus draw) per row;
    q rows after the rejection point are never read.
    """
    op = "verify_chain"
    _probs_arg(target_probs, op, "target_probs", 3, "[B, G+1, V]")
    _probs_arg(draft_probs, op, "draft_probs", 3, "[B, G, V]")
    B, G1, V = target_probs.shape
    _ids_arg(draft_tokens, op, "draft_tokens", (B, G1 - 1))
    if tuple(draft_probs.shape) != (B, G1 - 1, V):
        raise ValueError(f"mmfm.{op}: argument 'draft_probs' must have shape [B, G, V] = [{B}, {G1 - 1}, {V}], got "
                         f"{tuple(draft_probs.shape)}")
    if target_probs.dtype != draft_probs.dtype:
        raise TypeError(f"mmfm.{op}: 'target_probs' ({target_probs.dtype}) and 'draft_probs' ({draft_probs.dtype}) "
                        "must have the same dtype")
    s, o = _seed_offset(generator, seed, offset, target_probs.device)
    if compiled(target_probs):
        return torch.ops.mmfm.verify_chain(target_probs.detach(), draft_probs.detach(), draft_tokens, s, o)
    _check_ids(op, "draft_tokens", draft_tokens, V)
    _check_probs_values(op, ("target_probs", target_probs), ("draft_probs", draft_probs))
    return verify_chain_reference(target_probs, draft_probs, draft_tokens,
                                  _reference_generator(s, o, target_probs.device))


def verify_multi_draft_reference(target_probs, draft_probs, candidates, replacement=True, generator=None):
    """Recursive rejection sampling, row by row: r = p; for each candidate x_i (q_i = q, or q
    without the earlier candidates, renormalised): accept with min(1, r(x)/q_i(x)), else
    r = norm(max(0, r - q_i)); if all are rejected, draw from r."""
    B, V = target_probs.shape
    K = candidates.shape[1]
    per_draft = draft_probs.dim() == 3
    token = torch.empty(B, dtype=torch.int64, device=target_probs.device)
    index = torch.empty(B, dtype=torch.int64, device=target_probs.device)
    for b in range(B):
        r = target_probs[b].double().clamp(min=0)
        r = r / r.sum()
        q = draft_probs[b].double()
        removed = torch.zeros(V, dtype=torch.bool, device=r.device)
        token[b], index[b] = -1, -1
        for i in range(K):
            x = int(candidates[b, i])
            qi = q[i] if per_draft else q
            if not replacement:
                rest = 1.0 - float(q[removed].sum())
                if not rest > 0:
                    break
                qi = qi.masked_fill(removed, 0.0) / rest
            u = float(torch.rand((), dtype=torch.float64, generator=generator, device=r.device))
            if u * float(qi[x]) < float(r[x]):
                token[b], index[b] = x, i
                break
            r = (r - qi).clamp(min=0)
            if not float(r.sum()) > 0:
                r = target_probs[b].double()
                break
            r = r / r.sum()
            removed[x] = True
        if index[b] < 0:
            token[b] = torch.multinomial(r, 1, generator=generator)[0]
    return token, index


def verify_multi_draft(target_probs: torch.Tensor, draft_probs: torch.Tensor, candidates: torch.Tensor, *,
                       replacement: bool = True, generator: torch.Generator | None = None, seed: int | None = None,
                       offset: int = 0):
    """Multi-draft verification at one position by recursive rejection sampling (SpecTr /
    "Towards Optimal Multi-draft Speculative Decoding").

    target_probs p [B, V]; draft_probs q [B, V] shared by the K candidates, or [B, K, V] (one
    draft distribution per candidate, replacement=True only); candidates [B, K] int64: drawn
    i.i.d. from q (replacement=True) or without replacement (replacement=False, e.g.
    torch.multinomial(q, K)). With r_0 = p: candidate i is accepted with probability
    min(1, r_i(x_i) / q_i(x_i)), where q_i = q (with replacement) or q with the earlier
    candidates removed and renormalised (without); on rejection r_{i+1} = norm(max(0, r_i - q_i)).
    If every candidate is rejected the token is drawn from r_K. The token is distributed
    exactly as p; drafts without replacement are accepted more often.
    Returns (token [B] int64, accepted_index [B] int64: the accepted candidate, or -1).

    Cost: O(K) per acceptance test plus one pass over V per rejected candidate and for the
    final draw.
    """
    op = "verify_multi_draft"
    _probs_arg(target_probs, op, "target_probs", 2, "[B, V]")
    _tensor_arg(draft_probs, op, "draft_probs")
    B, V = target_probs.shape
    _tensor_arg(candidates, op, "candidates")
    if candidates.dim() != 2 or candidates.shape[0] != B:
        raise ValueError(f"mmfm.{op}: argument 'candidates' must have shape [B={B}, K], got {tuple(candidates.shape)}")
    K = candidates.shape[1]
    _ids_arg(candidates, op, "candidates", (B, K))
    if draft_probs.dtype not in FLOAT_TYPES:
        raise TypeError(f"mmfm.{op}: argument 'draft_probs' must be float32, float16 or bfloat16, got {draft_probs.dtype}")
    if tuple(draft_probs.shape) not in ((B, V), (B, K, V)):
        raise ValueError(f"mmfm.{op}: argument 'draft_probs' must have shape [B, V] = [{B}, {V}] or [B, K, V] = "
                         f"[{B}, {K}, {V}], got {tuple(draft_probs.shape)}")
    if draft_probs.dim() == 3 and not replacement:
        raise ValueError(f"mmfm.{op}: per-draft 'draft_probs' [B, K, V] needs replacement=True")
    if target_probs.dtype != draft_probs.dtype:
        raise TypeError(f"mmfm.{op}: 'target_probs' ({target_probs.dtype}) and 'draft_probs' ({draft_probs.dtype}) "
                        "must have the same dtype")
    s, o = _seed_offset(generator, seed, offset, target_probs.device)
    if compiled(target_probs):
        return torch.ops.mmfm.verify_multi_draft(target_probs.detach(), draft_probs.detach(), candidates,
                                                 bool(replacement), s, o)
    _check_ids(op, "candidates", candidates, V)
    if not replacement and K > 1:
        srt = candidates.sort(1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(f"mmfm.{op}: argument 'candidates' repeats a token in row {row}; with replacement=False "
                             "the candidates must be distinct (drawn without replacement)")
    _check_probs_values(op, ("target_probs", target_probs), ("draft_probs", draft_probs))
    return verify_multi_draft_reference(target_probs, draft_probs, candidates, bool(replacement),
                                        _reference_generator(s, o, target_probs.device))


__all__ = [
    "sample", "processed_probs", "verify_chain", "verify_multi_draft", "pack_params",
    "sample_reference", "processed_probs_reference", "verify_chain_reference", "verify_multi_draft_reference",
    "PARAM_NAMES",
]
