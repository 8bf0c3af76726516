"""Decode-time attention: the few new queries of a decode step (one per row) or of a draft tree
(n nodes of one row) against a static KV cache layer.

    decode_attention(q [B, n, H, hd], k [B, Hkv, T, hd], v, prefix [B] int64, mask=None) -> [B, n, H, hd]
    decode_attention_reference(...)

Row b's queries all see the cache's keys [0, prefix[b]); query i also sees the new block's key
prefix[b] + j when mask[i, j] (bool [n, n], mask[i, i] True: a tree's ancestor mask) or, without
a mask, when j <= i (causal; n = 1 is a plain decode step). Scores are scaled by 1 / sqrt(hd);
grouped-query heads h read kv head h // (H / Hkv). The caller has written the new keys and values
into slots [prefix[b], prefix[b] + n) already.

Why compiled (csrc/attention/decode_attention_cpu.cpp): at decode sizes (one query per head,
hundreds of keys) torch's CPU scaled_dot_product_attention spends ~25 us per call around a few
microseconds of arithmetic, once per layer and step. CPU float32 only, like decode_linear; other
devices and dtypes, and builds without mmfm._C (one warning), run the reference, which is SDPA
with the equivalent mask. Figures: docs/benchmarks.md, "## decode_linear"; the op:
docs/ops_decode.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm._ext import compiled


def visible_mask(prefix: torch.Tensor, n: int, T: int, mask: torch.Tensor | None) -> torch.Tensor:
    """bool [B, 1, n, T]: key t visible to query i of row b (SDPA's attn_mask convention)."""
    t = torch.arange(T, device=prefix.device)
    old = t[None, None, :] < prefix[:, None, None]                               # [B, 1, T]
    j = t[None, :] - prefix[:, None]                                             # [B, T]: new-block index
    inside = (j >= 0) & (j < n)
    if mask is None:
        allow = j[:, None, :] <= torch.arange(n, device=prefix.device)[None, :, None]   # [B, n, T]
    else:
        allow = mask.to(prefix.device)[:, j.clamp(0, n - 1)].permute(1, 0, 2)         # [B, n, T]
    return (old | (inside[:, None, :] & allow))[:, None]


def decode_attention_reference(q, k, v, prefix, mask=None) -> torch.Tensor:
    B, n, H, hd = q.shape
    vis = visible_mask(prefix, n, k.shape[2], mask)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=vis, enable_gqa=H != k.shape[1])
    return out.transpose(1, 2).contiguous()


# head sizes csrc/attention/decode_attention_cpu.cpp has a register-resident kernel for (avx2_for)
KERNEL_HEAD_DIMS = (8, 16, 24, 32, 48, 64, 96, 128)


def compiled_op_for(device, dtype, head_dim: int):
    """torch.ops.mmfm.decode_attention when its vectorised kernel serves this case (CPU float32,
    mmfm._C built with the AVX2 kernels, a head size in KERNEL_HEAD_DIMS), else None: the portable
    loop is slower than SDPA (`mmfm bench attention`'s mmfm_generic), so callers that choose once
    (DenseStep) keep SDPA there. The AVX2 kernels of csrc/attention and csrc/linear are compiled
    under the same condition, which mmfm._C.decode_linear_isa reports."""
    from mmfm.ops.linear import decode_linear_isa

    isa = decode_linear_isa()
    if (torch.device(device).type != "cpu" or dtype != torch.float32 or head_dim not in KERNEL_HEAD_DIMS
            or isa is None or isa == "generic"):
        return None
    return torch.ops.mmfm.decode_attention.default


_OP = {}


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: torch.Tensor,
                     mask: torch.Tensor | None = None, generic: bool = False) -> torch.Tensor:
    """The compiled op on CPU float32 (generic: its portable loop; tests), else the reference."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32 and compiled(q):
        op = _OP.get("op")
        if op is None:
            op = _OP["op"] = torch.ops.mmfm.decode_attention.default
        return op(q, k, v, prefix, mask, generic)
    return decode_attention_reference(q, k, v, prefix, mask)


__all__ = ["decode_attention", "decode_attention_reference", "compiled_op_for", "visible_mask",
           "KERNEL_HEAD_DIMS"]
