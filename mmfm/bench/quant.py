"""Benchmark of the quantization ops: compiled (impl `mmfm`) against the pure-torch
reference (`reference`), torch.cdist + argmin (`torch_cdist`) and vector-quantize-pytorch's
VectorQuantize forward (`vector_quantize_pytorch`, when installed), with the peak extra
memory of each.

    mmfm bench quant [--json PATH] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import base_parser, machine, parse_args, report, time_impls
from mmfm.ops import quant

NEAREST_CASES = [(1024, 32), (16384, 32), (16384, 8), (1024, 256)]


def _vqp(K: int, D: int, codebook: torch.Tensor):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    vq = VectorQuantize(dim=D, codebook_size=K).to(codebook.device).eval()
    with torch.no_grad():
        vq._codebook.embed.copy_(codebook[None])
    return vq


def bench_nearest(N: int, K: int, D: int, dtype: torch.dtype, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g).to(device, dtype)
    e = torch.randn(K, D, generator=g).to(device, dtype)
    case = {"op": "nearest_code", "N": N, "K": K, "D": D, "dtype": str(dtype).replace("torch.", ""), "device": device}
    impls = {
        "mmfm": lambda: quant.nearest_code(z, e),
        "torch_cdist": lambda: torch.cdist(z.float(), e.float()).argmin(1),
        "reference": lambda: quant.nearest_code_reference(z, e),
    }
    vq = _vqp(K, D, e.float()) if dtype == torch.float32 else None
    if vq is not None:
        impls["vector_quantize_pytorch"] = lambda: vq(z[None])
    return time_impls("quant", case, impls, device, repeats)


def bench_elementwise(N: int, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    levels = [8, 5, 5, 5]
    z = torch.randn(N, 4, generator=g).to(device)
    case = {"op": "fsq_quantize", "N": N, "levels": "8-5-5-5", "device": device}
    lv = quant.as_levels(levels)
    out += time_impls("quant", case, {"mmfm": lambda: quant.fsq_quantize(z, levels),
                                      "reference": lambda: quant.fsq_quantize_reference(z, lv)},
                      device, repeats, memory=False)
    zl = torch.randn(N, 16, generator=g).to(device)
    case = {"op": "lfq_entropy_exact", "N": 4096, "d": 12, "device": device}
    zs = zl[:4096, :12].contiguous()
    out += time_impls("quant", case, {"mmfm": lambda: quant.lfq_entropy(zs, 1.0, True),
                                      "reference": lambda: quant.lfq_entropy_reference(zs, 1.0, True)},
                      device, repeats)
    x = torch.randn(N, 32, generator=g).to(device)
    idx = torch.randint(0, 1024, (N,), generator=g).to(device)
    case = {"op": "code_stats", "N": N, "K": 1024, "D": 32, "device": device}
    out += time_impls("quant", case, {"mmfm": lambda: quant.code_stats(x, idx, 1024),
                                      "reference": lambda: quant.code_stats_reference(x, idx, 1024)},
                      device, repeats, memory=False)
    cbs = torch.randn(8, 1024, 32, generator=g).to(device)
    case = {"op": "residual_vq", "N": N, "M": 8, "K": 1024, "D": 32, "device": device}
    out += time_impls("quant", case, {"mmfm": lambda: quant.residual_vq(x, cbs),
                                      "reference": lambda: quant.residual_vq_reference(x, cbs)},
                      device, repeats)
    return out


def main(argv=None) -> int:
    args = parse_args(base_parser("quant", __doc__.split("\n\n")[0]), argv)
    if args is None:
        return 2
    device = args.device
    N = 1024 if args.quick else 16384
    cases = [(64, 8), (256, 32)] if args.quick else NEAREST_CASES
    repeats = 1 if args.quick else args.repeats
    print(f"# quant benchmark on {machine()}", file=sys.stderr)
    records: list[dict] = []
    for K, D in cases:
        records += bench_nearest(N, K, D, torch.float32, device, repeats)
    if not args.quick:
        records += bench_nearest(N, 16384, 32, torch.bfloat16, device, repeats)
    records += bench_elementwise(N, device, repeats)
    return report(records, args.json, ratio_to="reference")


if __name__ == "__main__":
    sys.exit(main())
