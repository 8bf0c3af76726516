"""Decode-time linear layers: y = residual + s * (x @ W) for the few rows of one decode step
(one row per sequence) or one draft tree (up to a few dozen nodes).

    w = pack_linear(weight_in_out)          once, when a decode step is built
    decode_linear(x, w, rms_add=None, residual=None)
    decode_linear_reference(x, weight, rms_add=None, residual=None)

s is 1, or, when `rms_add` is given, rsqrt(sum(x^2, -1) + rms_add) per row: RMSNorm with its
weight folded into W's rows (mmfm.generate.step.DenseStep does the folding).

Why a compiled op for something torch.mm does: decoding reads every weight of the model once
per step, and between steps the weights do not stay in cache. For a handful of rows against a
weight read from memory, the CPU BLAS reads W more than once: a GEMV over F.linear's [out, in]
rows prefetches poorly, and a GEMM with a few rows repacks W on every call. The op reads W once
from 16-column panels packed when the step is built (csrc/linear/decode_linear_cpu.cpp), and
a draft tree of up to 12 rows (6 without AVX-512VL) costs about what one row does: the tree
pass Token Recycling is built on. Figures: docs/benchmarks.md, "decode_linear"; the op:
docs/ops_decode.md.

The compiled op is CPU and float32 only. pack_linear keeps every other case on torch: CUDA
weights (a GPU's few-row matmul is what cuBLAS does well; not measured here), other dtypes,
builds whose micro-kernel is the portable loop (no AVX2 + FMA at -march), and builds without
mmfm._C (one warning), where W is kept as a contiguous [in, out] matrix, the faster of torch.mm's
two layouts on CPU (measured beside the packed op).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmfm._ext import compiled

PANEL = 16   # output columns per packed panel (csrc/linear/linear_kernels.h kPanel)


@dataclass(frozen=True)
class PackedLinear:
    """A weight [in, out] ready for decode_linear: `packed` [ceil(out / 16), in, 16] for the
    compiled op, or `weight` [in, out] for torch (exactly one of them is set)."""
    in_features: int
    out_features: int
    packed: torch.Tensor | None = None
    weight: torch.Tensor | None = None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[in, out] -> [ceil(out / 16), in, 16], zero-padded: panel p holds columns 16p .. 16p + 15."""
    if weight.dim() != 2:
        raise ValueError(f"mmfm.pack_linear: argument 'weight' must have shape [in, out], got {tuple(weight.shape)}")
    n_in, n_out = weight.shape
    panels = -(-n_out // PANEL)
    padded = F.pad(weight, (0, panels * PANEL - n_out))
    return padded.reshape(n_in, panels, PANEL).permute(1, 0, 2).contiguous()


def unpack_panels(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of pack_panels: [in, out_features]."""
    panels, n_in, _ = packed.shape
    return packed.permute(1, 0, 2).reshape(n_in, panels * PANEL)[:, :out_features]


def _vectorised() -> bool:
    """Whether the build compiled the AVX2 micro-kernel. A build without it (another -march, or
    not x86) has only the portable loop, which is correct but slower than torch: it keeps torch."""
    isa = decode_linear_isa()
    return isa is not None and isa != "generic"


def pack_linear(weight: torch.Tensor) -> PackedLinear:
    """Prepare `weight` [in, out] (any strides) for decode_linear. CPU float32 with mmfm._C and
    its AVX2 micro-kernel: packed panels. Otherwise torch: on CPU a contiguous copy, on other
    devices the tensor as given (F.linear's [out, in] storage seen through .t())."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("mmfm.pack_linear: argument 'weight' must be a 2-d tensor [in, out], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    n_in, n_out = weight.shape
    weight = weight.detach()
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and compiled(weight) and _vectorised():
        return PackedLinear(n_in, n_out, packed=pack_panels(weight))
    if weight.device.type == "cpu":
        weight = weight.contiguous()
    return PackedLinear(n_in, n_out, weight=weight)


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, rms_add: float | None = None,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + s * (x @ weight) in torch; weight [in, out]."""
    if rms_add is None:
        return torch.mm(x, weight) if residual is None else torch.addmm(residual, x, weight)
    s = torch.bmm(x[:, None, :], x[:, :, None]).view(-1, 1).add_(rms_add).rsqrt_()
    y = torch.mm(x, weight).mul_(s)
    return y if residual is None else y.add_(residual)


_OP = {}


def decode_linear(x: torch.Tensor, w: PackedLinear, rms_add: float | None = None,
                  residual: torch.Tensor | None = None, generic: bool = False) -> torch.Tensor:
    """x [n, in] -> [n, out]: residual + s * (x @ W), s = rsqrt(sum(x^2) + rms_add) per row when
    rms_add is given, else 1. The compiled op when `w` was packed, else decode_linear_reference.
    generic: run the op's portable loop instead of its AVX2 micro-kernel (tests, benchmark).
    The op checks its arguments and names them; this wrapper adds nothing to the hot path."""
    if w.packed is not None:
        op = _OP.get("op")
        if op is None:
            op = _OP["op"] = torch.ops.mmfm.decode_linear.default
        return op(x, w.packed, w.out_features, rms_add, residual, generic)
    return decode_linear_reference(x, w.weight, rms_add, residual)


def decode_linear_isa() -> str | None:
    """The micro-kernel the loaded extension compiled ("avx2-fma x12", "avx2-fma x6", "generic"), or None."""
    from mmfm._ext import _load

    mod = _load()
    return getattr(mod, "decode_linear_isa", None) if mod is not None else None


__all__ = ["PackedLinear", "pack_linear", "pack_panels", "unpack_panels", "decode_linear",
           "decode_linear_reference", "decode_linear_isa", "PANEL"]
