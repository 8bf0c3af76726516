"""Quantization ops: nearest-code search, EMA codebook statistics, FSQ, LFQ, residual VQ.

Each function validates its arguments (errors name the argument), then runs the compiled
kernel (torch.ops.mmfm.*, csrc/quant) or, when the extension is absent, the pure-torch
reference defined beside it (`*_reference`). The references are short and meant to be
obviously right; the tests compare the two. Algorithms and costs are in docs/ops.md.
"""
from __future__ import annotations

import math

import torch

from mmfm._ext import compiled

FLOAT_TYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------- validation
def _float_arg(t, op: str, name: str, dims: int | None = None, shape: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_TYPES:
        raise TypeError(f"mmfm.{op}: argument '{name}' must be float32 or bfloat16, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"mmfm.{op}: argument '{name}' must have shape {shape} ({dims} dims), got {tuple(t.shape)}")


def _long_arg(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"mmfm.{op}: argument '{name}' must be int64, got {t.dtype}")


def _nonempty(t: torch.Tensor, op: str, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"mmfm.{op}: argument '{name}' is empty (shape {tuple(t.shape)}); it needs at least one element")


def _finite(t: torch.Tensor, op: str, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"mmfm.{op}: argument '{name}' contains NaN or inf; quantizer inputs must be finite")


def as_levels(levels, op: str = "fsq") -> torch.Tensor:
    """FSQ levels as a CPU int64 tensor [C], each >= 2, product below 2^62."""
    t = torch.as_tensor(levels, dtype=torch.int64, device="cpu").flatten() if not isinstance(levels, torch.Tensor) else levels
    if t.dtype != torch.int64:
        raise TypeError(f"mmfm.{op}: argument 'levels' must hold integers, got {t.dtype}")
    t = t.detach().to("cpu").flatten()
    if t.numel() == 0:
        raise ValueError(f"mmfm.{op}: argument 'levels' is empty; give one level count per channel, e.g. [8, 5, 5, 5]")
    if int(t.min()) < 2:
        raise ValueError(f"mmfm.{op}: every entry of 'levels' must be >= 2, got {t.tolist()}")
    if float(torch.log(t.double()).sum()) >= 62 * math.log(2):
        raise ValueError(f"mmfm.{op}: the product of 'levels' {t.tolist()} must stay below 2^62 so indices fit int64")
    return t


def _flatten_rows(z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return z.reshape(-1, z.shape[-1]), tuple(z.shape[:-1])


# ---------------------------------------------------------------- 1. nearest-code search
def nearest_code_reference(z: torch.Tensor, codebook: torch.Tensor, topk: int = 1, cosine: bool = False,
                           chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 in fp32, `chunk` rows at a time; ties -> lowest index."""
    z, e = z.float(), codebook.float()
    if cosine:
        z, e = torch.nn.functional.normalize(z, dim=-1, eps=1e-12), torch.nn.functional.normalize(e, dim=-1, eps=1e-12)
    e_norm = (e * e).sum(-1)
    idx_out, dist_out = [], []
    for zc in z.split(chunk):
        d = (zc * zc).sum(-1, keepdim=True) - 2.0 * zc @ e.t() + e_norm
        if topk == 1:
            i = d.argmin(-1, keepdim=True)  # first minimum: the lowest index among ties
        else:
            i = d.sort(dim=-1, stable=True).indices[:, :topk]
        idx_out.append(i)
        dist_out.append(d.gather(-1, i).clamp_min(0.0))
    return torch.cat(idx_out), torch.cat(dist_out)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, topk: int = 1,
                 cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entries of each row of z, without the N x K distance matrix.

    z [..., D] and codebook [K, D] (float32 or bfloat16, same dtype; fp32 accumulation).
    Returns indices (int64) and squared L2 distances (fp32), shaped [...] for topk=1 and
    [..., topk] (ascending) otherwise. Ties go to the lowest index. With cosine=True, rows
    and codes are l2-normalised first (distance = 2 - 2 cos).

    Algorithm (CPU): the codebook is packed into panels of 16 codes; a 6 x 16 register tile
    of dot products is accumulated over D (a GEMM micro-kernel) and folded into a running
    per-row minimum as ||e||^2 - 2 z.e, so memory stays O(K D + N). O(N K D) flops.
    """
    op = "nearest_code"
    _float_arg(z, op, "z")
    _float_arg(codebook, op, "codebook", 2, "[K, D]")
    if z.dim() < 1:
        raise ValueError(f"mmfm.{op}: argument 'z' must have shape [..., D], got a scalar")
    if z.dtype != codebook.dtype:
        raise TypeError(f"mmfm.{op}: 'z' ({z.dtype}) and 'codebook' ({codebook.dtype}) must have the same dtype")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"mmfm.{op}: 'z' has D={z.shape[-1]} but 'codebook' has D={codebook.shape[1]}; "
                         "the last dimensions must match")
    if z.device != codebook.device:
        raise ValueError(f"mmfm.{op}: 'z' ({z.device}) and 'codebook' ({codebook.device}) must be on the same device")
    _nonempty(z, op, "z")
    _nonempty(codebook, op, "codebook")
    if not 1 <= int(topk) <= codebook.shape[0]:
        raise ValueError(f"mmfm.{op}: 'topk' must be in [1, K={codebook.shape[0]}], got {topk}")
    rows, lead = _flatten_rows(z.detach())
    if compiled(z):
        idx, dist = torch.ops.mmfm.nearest_code(rows, codebook.detach(), int(topk), bool(cosine))
    else:
        _finite(z, op, "z")
        _finite(codebook, op, "codebook")
        idx, dist = nearest_code_reference(rows, codebook.detach(), int(topk), bool(cosine))
    shape = lead if topk == 1 else lead + (int(topk),)
    return idx.reshape(shape), dist.reshape(shape)


# ------------------------------------------------------------- 2. EMA codebook statistics
def code_stats_reference(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.float()
    sums = torch.zeros(num_codes, z.shape[1], dtype=torch.float32, device=z.device).index_add_(0, indices, z)
    counts = torch.bincount(indices, minlength=num_codes).float()
    return sums, counts


def code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code sums [K, D] and counts [K] of the rows of z [N, D] assigned by indices [N].

    Deterministic: the compiled CPU kernel counting-sorts the rows by code and each code sums
    its rows in row order, so the result does not depend on the number of threads.
    """
    op = "code_stats"
    _float_arg(z, op, "z", 2, "[N, D]")
    _long_arg(indices, op, "indices")
    if indices.dim() != 1 or indices.shape[0] != z.shape[0]:
        raise ValueError(f"mmfm.{op}: 'indices' must have shape [N={z.shape[0]}], got {tuple(indices.shape)}")
    if int(num_codes) < 1:
        raise ValueError(f"mmfm.{op}: 'num_codes' must be >= 1, got {num_codes}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(f"mmfm.{op}: every entry of 'indices' must be in [0, num_codes={num_codes})")
    if compiled(z):
        return torch.ops.mmfm.code_stats(z.detach(), indices, int(num_codes))
    _finite(z, op, "z")
    return code_stats_reference(z.detach(), indices, int(num_codes))


def ema_codebook_update_reference(cluster_size, embed_sum, counts, sums, decay, eps, dead_threshold):
    new_size = decay * cluster_size + (1 - decay) * counts
    new_sum = decay * embed_sum + (1 - decay) * sums
    n = new_size.sum()
    smoothed = (new_size + eps) / (n + cluster_size.shape[0] * eps) * n
    return new_size, new_sum, new_sum / smoothed[:, None], new_size < dead_threshold


def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
                        decay: float, eps: float = 1e-5, dead_threshold: float = 1.0):
    """One EMA step with Laplace smoothing, and dead-code detection.

    new_size = decay * size + (1 - decay) * counts; new_sum likewise; the codebook is
    new_sum / ((new_size + eps) / (n + K eps) * n) with n = sum(new_size); a code is dead when
    its smoothed-free EMA count falls below dead_threshold. Returns
    (new_cluster_size [K], new_embed_sum [K, D], codebook [K, D], dead [K] bool).
    """
    op = "ema_codebook_update"
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum), ("counts", counts), ("sums", sums)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"mmfm.{op}: argument '{name}' must be a float32 tensor")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"mmfm.{op}: 'decay' must be in [0, 1), got {decay}")
    if eps <= 0:
        raise ValueError(f"mmfm.{op}: 'eps' must be > 0, got {eps}")
    if (embed_sum.dim() != 2 or cluster_size.shape != (embed_sum.shape[0],) or counts.shape != cluster_size.shape
            or sums.shape != embed_sum.shape):
        raise ValueError(f"mmfm.{op}: shapes must be cluster_size [K], embed_sum [K, D], counts [K], sums [K, D]; got "
                         f"{tuple(cluster_size.shape)}, {tuple(embed_sum.shape)}, {tuple(counts.shape)}, {tuple(sums.shape)}")
    if compiled(cluster_size):
        return torch.ops.mmfm.ema_codebook_update(cluster_size, embed_sum, counts, sums, float(decay), float(eps),
                                                  float(dead_threshold))
    return ema_codebook_update_reference(cluster_size, embed_sum, counts, sums, decay, eps, dead_threshold)


# ------------------------------------------------------------------------------ 3. FSQ
def fsq_bound_reference(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """tanh bound with a half-step offset for even levels: values in (-L/2, L/2) around the grid."""
    lv = levels.to(z.device, torch.float32)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels.to(z.device) % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z.float() + shift) * half_l - offset


def _fsq_radix(levels: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)


def fsq_quantize_reference(z: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.round(fsq_bound_reference(z, levels))
    half_width = (levels // 2).to(z.device)
    codes = q / half_width
    idx = ((q.long() + half_width) * _fsq_radix(levels).to(z.device)).sum(-1)
    return codes, idx


def fsq_indices_to_codes_reference(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    lv = levels.to(indices.device)
    digits = (indices[..., None] // _fsq_radix(lv)) % lv
    return (digits - lv // 2).float() / (lv // 2)


def fsq_codes_to_indices_reference(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    lv = levels.to(codes.device)
    digits = (torch.round(codes.float() * (lv // 2)).long() + lv // 2).clamp(torch.zeros_like(lv), lv - 1)
    return (digits * _fsq_radix(lv)).sum(-1)


class _FSQFunction(torch.autograd.Function):
    """Forward: the compiled quantizer. Backward: straight-through the rounding, through the bound."""

    @staticmethod
    def forward(ctx, z, levels, use_compiled):
        rows, lead = _flatten_rows(z)
        if use_compiled:
            codes, idx = torch.ops.mmfm.fsq_quantize(rows, levels)
        else:
            codes, idx = fsq_quantize_reference(rows, levels)
        ctx.save_for_backward(z, levels)
        ctx.mark_non_differentiable(idx)
        return codes.reshape(z.shape).to(z.dtype), idx.reshape(lead)

    @staticmethod
    def backward(ctx, grad_codes, grad_idx):
        z, levels = ctx.saved_tensors
        lv = levels.to(z.device, torch.float32)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels.to(z.device) % 2 == 0, 0.5, 0.0)
        t = torch.tanh(z.float() + torch.atanh(offset / half_l))
        grad = grad_codes.float() * half_l * (1 - t * t) / (levels.to(z.device) // 2)
        return grad.to(z.dtype), None, None


def fsq_quantize(z: torch.Tensor, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantization of z [..., C] with `levels` [C] (each >= 2).

    codes = round(tanh(z + shift) * half_l - offset) / (L // 2) in [-1, 1] (half-step offset
    for even L), with a straight-through gradient (d codes / dz = d bound / dz / (L // 2));
    indices = mixed-radix number of the digits, channel 0 fastest. Returns (codes in z's
    dtype, indices int64 [...]).
    """
    op = "fsq_quantize"
    _float_arg(z, op, "z")
    lv = as_levels(levels, op)
    if z.dim() < 1 or z.shape[-1] != lv.numel():
        raise ValueError(f"mmfm.{op}: 'z' must have shape [..., C={lv.numel()}] to match 'levels', got {tuple(z.shape)}")
    use = compiled(z)
    if not use:
        _finite(z, op, "z")
    return _FSQFunction.apply(z, lv, use)


def fsq_indices_to_codes(indices: torch.Tensor, levels) -> torch.Tensor:
    """Codes [..., C] in [-1, 1] for FSQ indices [...]."""
    op = "fsq_indices_to_codes"
    _long_arg(indices, op, "indices")
    lv = as_levels(levels, op)
    size = int(torch.prod(lv))
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"mmfm.{op}: every entry of 'indices' must be in [0, prod(levels)={size})")
    flat = indices.reshape(-1)
    out = (torch.ops.mmfm.fsq_indices_to_codes(flat, lv) if compiled(indices)
           else fsq_indices_to_codes_reference(flat, lv))
    return out.reshape(tuple(indices.shape) + (lv.numel(),))


def fsq_codes_to_indices(codes: torch.Tensor, levels) -> torch.Tensor:
    """FSQ indices [...] for codes [..., C] on the grid (off-grid values snap to the nearest level)."""
    op = "fsq_codes_to_indices"
    _float_arg(codes, op, "codes")
    lv = as_levels(levels, op)
    if codes.dim() < 1 or codes.shape[-1] != lv.numel():
        raise ValueError(f"mmfm.{op}: 'codes' must have shape [..., C={lv.numel()}], got {tuple(codes.shape)}")
    rows, lead = _flatten_rows(codes.detach())
    if compiled(codes):
        return torch.ops.mmfm.fsq_codes_to_indices(rows, lv).reshape(lead)
    _finite(codes, op, "codes")
    return fsq_codes_to_indices_reference(rows, lv).reshape(lead)


# ------------------------------------------------------------------------------ 4. LFQ
def lfq_quantize_reference(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = z > 0
    codes = torch.where(bits, 1.0, -1.0)
    weights = 2 ** torch.arange(z.shape[-1], device=z.device, dtype=torch.int64)
    return codes, (bits.long() * weights).sum(-1)


def lfq_indices_to_codes_reference(indices: torch.Tensor, dim: int) -> torch.Tensor:
    shifts = torch.arange(dim, device=indices.device, dtype=torch.int64)
    return torch.where((indices[..., None] >> shifts) & 1 == 1, 1.0, -1.0)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, use_compiled):
        rows, lead = _flatten_rows(z)
        codes, idx = torch.ops.mmfm.lfq_quantize(rows) if use_compiled else lfq_quantize_reference(rows)
        ctx.mark_non_differentiable(idx)
        return codes.reshape(z.shape).to(z.dtype), idx.reshape(lead)

    @staticmethod
    def backward(ctx, grad_codes, grad_idx):
        return grad_codes, None


def lfq_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign quantization of z [..., d] (d <= 62): codes = +1 where z > 0 else -1 (identity
    straight-through gradient) and indices = sum_i 2^i [z_i > 0] (int64 [...])."""
    op = "lfq_quantize"
    _float_arg(z, op, "z")
    if z.dim() < 1 or not 1 <= z.shape[-1] <= 62:
        raise ValueError(f"mmfm.{op}: 'z' must have shape [..., d] with 1 <= d <= 62, got {tuple(z.shape)}")
    use = compiled(z)
    if not use:
        _finite(z, op, "z")
    return _SignSTE.apply(z, use)


def lfq_indices_to_codes(indices: torch.Tensor, dim: int) -> torch.Tensor:
    """Codes [..., dim] of +-1 for LFQ indices [...]."""
    op = "lfq_indices_to_codes"
    _long_arg(indices, op, "indices")
    if not 1 <= int(dim) <= 62:
        raise ValueError(f"mmfm.{op}: 'dim' must be in [1, 62], got {dim}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2 ** int(dim)):
        raise ValueError(f"mmfm.{op}: every entry of 'indices' must be in [0, 2^dim)")
    flat = indices.reshape(-1)
    out = torch.ops.mmfm.lfq_indices_to_codes(flat, int(dim)) if compiled(indices) else lfq_indices_to_codes_reference(flat, int(dim))
    return out.reshape(tuple(indices.shape) + (int(dim),))


def lfq_entropy_reference(z: torch.Tensor, temperature: float = 1.0, exact: bool = True) -> torch.Tensor:
    """[mean per-sample entropy, codebook entropy] with bit probabilities sigmoid(4 z / tau).

    exact=True enumerates all 2^d codes (softmax of -||z - c||^2 / tau over them);
    exact=False uses the per-bit form sum_i Hb(mean_n p_ni).
    """
    z = z.float()
    s = 4 * z / temperature
    p = torch.sigmoid(s)
    sample = (p * torch.nn.functional.softplus(-s) + (1 - p) * torch.nn.functional.softplus(s)).sum(-1).mean()
    if exact:
        d = z.shape[-1]
        codes = lfq_indices_to_codes_reference(torch.arange(2 ** d, device=z.device), d)  # [2^d, d]
        logits = 2 * z @ codes.t() / temperature  # -||z - c||^2 / tau up to a per-row constant
        avg = torch.softmax(logits, -1).mean(0)
        codebook = -(avg * torch.log(avg.clamp_min(1e-30))).sum()
    else:
        m = p.mean(0)
        codebook = -(m * torch.log(m.clamp_min(1e-30)) + (1 - m) * torch.log((1 - m).clamp_min(1e-30))).sum()
    return torch.stack([sample, codebook])


class _LFQEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, temperature, exact):
        ctx.save_for_backward(z)
        ctx.args = (temperature, exact)
        return torch.ops.mmfm.lfq_entropy(z, temperature, exact)

    @staticmethod
    def backward(ctx, grad_out):
        (z,) = ctx.saved_tensors
        temperature, exact = ctx.args
        return torch.ops.mmfm.lfq_entropy_backward(grad_out.float().contiguous(), z, temperature, exact), None, None


def lfq_entropy(z: torch.Tensor, temperature: float = 1.0, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy terms of the LFQ penalty for z [..., d] (differentiable).

    Returns (mean per-sample entropy, codebook entropy of the batch mean) in nats; the
    penalty is `sample - codebook` (confident codes, evenly used). exact=None picks the
    exact 2^d enumeration for d <= 16 and the factorised per-bit form above. The compiled
    kernel enumerates codes per sample by doubling and never forms N x 2^d.
    """
    op = "lfq_entropy"
    _float_arg(z, op, "z")
    if z.dim() < 1:
        raise ValueError(f"mmfm.{op}: 'z' must have shape [..., d]")
    _nonempty(z, op, "z")
    d = z.shape[-1]
    if temperature <= 0:
        raise ValueError(f"mmfm.{op}: 'temperature' must be > 0, got {temperature}")
    if exact is None:
        exact = d <= 16
    if exact and d > 16:
        raise ValueError(f"mmfm.{op}: 'exact' enumerates 2^d codes and needs d <= 16, got d={d}; "
                         "pass exact=False for the factorised per-bit form")
    rows = z.reshape(-1, d).float()
    if compiled(z):
        out = _LFQEntropy.apply(rows.contiguous(), float(temperature), bool(exact))
    else:
        _finite(z, op, "z")
        out = lfq_entropy_reference(rows, float(temperature), bool(exact))
    return out[0], out[1]


# ------------------------------------------------------------------------ 5. residual VQ
def residual_vq_reference(z: torch.Tensor, codebooks: torch.Tensor):
    residual = z.float()
    quantized = torch.zeros_like(residual)
    idx, norms = [], []
    for level in codebooks.float():
        i, _ = nearest_code_reference(residual, level)
        chosen = level[i[:, 0]]
        residual = residual - chosen
        quantized = quantized + chosen
        idx.append(i[:, 0])
        norms.append((residual * residual).sum(-1))
    return torch.stack(idx, 1), quantized, torch.stack(norms, 1)


def residual_vq(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M levels of nearest-code search on the running residual, in one call.

    z [..., D], codebooks [M, K, D] (same float dtype). r_0 = z, k_m = argmin ||r_{m-1} - e^m||,
    r_m = r_{m-1} - e^m_{k_m}. Returns indices [..., M], quantized [..., D] (fp32, the sum of
    the chosen codes; no gradient, wrap with a straight-through estimator) and the squared
    residual norm after each level [..., M].
    """
    op = "residual_vq"
    _float_arg(z, op, "z")
    _float_arg(codebooks, op, "codebooks", 3, "[M, K, D]")
    if z.dtype != codebooks.dtype:
        raise TypeError(f"mmfm.{op}: 'z' ({z.dtype}) and 'codebooks' ({codebooks.dtype}) must have the same dtype")
    if z.dim() < 1 or z.shape[-1] != codebooks.shape[2]:
        raise ValueError(f"mmfm.{op}: 'z' has D={z.shape[-1] if z.dim() else None} but 'codebooks' has D={codebooks.shape[2]}")
    _nonempty(z, op, "z")
    _nonempty(codebooks, op, "codebooks")
    rows, lead = _flatten_rows(z.detach())
    if compiled(z):
        idx, q, norms = torch.ops.mmfm.residual_vq(rows, codebooks.detach())
    else:
        _finite(z, op, "z")
        _finite(codebooks, op, "codebooks")
        idx, q, norms = residual_vq_reference(rows, codebooks.detach())
    M = codebooks.shape[0]
    return idx.reshape(lead + (M,)), q.reshape(lead + (z.shape[-1],)), norms.reshape(lead + (M,))


__all__ = [
    "nearest_code", "nearest_code_reference", "code_stats", "code_stats_reference", "ema_codebook_update",
    "ema_codebook_update_reference", "fsq_quantize", "fsq_quantize_reference", "fsq_indices_to_codes",
    "fsq_indices_to_codes_reference", "fsq_codes_to_indices", "fsq_codes_to_indices_reference", "lfq_quantize",
    "lfq_quantize_reference", "lfq_indices_to_codes", "lfq_indices_to_codes_reference", "lfq_entropy",
    "lfq_entropy_reference", "residual_vq", "residual_vq_reference", "as_levels",
]
