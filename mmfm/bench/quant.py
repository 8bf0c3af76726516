"""Benchmark of the quantization ops: compiled (impl `mmfm`) against the pure-torch reference
(`reference`) and, for the nearest-code search, the distance + argmin a user or a library runs,
with the peak extra memory of each.

nearest_code impls, all on the same z [N, D] and codebook [K, D], in the input dtype:
    mmfm                     mmfm.ops.quant.nearest_code (no N x K matrix)
    reference                the chunked pure-torch reference (fp32, 1024 rows at a time)
    torch_cdist              torch.cdist(z, e).argmin(1), in z's dtype (bf16 stays bf16)
    vector_quantize_pytorch  its EuclideanCodebook's distance and selection only: the library's
                             cdist(z, e) (einsum) negated and argmax'd, as its forward does in eval
                             mode, without the one-hot and the codebook gather that follow (when
                             the package is installed)
Before timing, each impl's indices are checked: the code it picked must be a nearest one within
the rounding of its dtype (fp64 distances of the same inputs; bf16 arithmetic may pick another
code of nearly equal distance), and `same_index` records the fraction of rows where it picked
mmfm's code. The other ops (fsq_quantize, lfq_entropy, code_stats, residual_vq) are checked
against their references (floats within 1e-3, indices equal on at least 99.9% of rows).
The mmfm impls must dispatch a torch.ops.mmfm op (mmfm/bench/common.py).

Times: medians over --repeats rounds, each round timing every impl once in turn. peak_extra_mb:
the peak memory an impl allocates through torch's allocator (CPU: torch's profiler memory
events; CUDA: the caching allocator's peak), where an N x K distance matrix shows. Scratch a C++
kernel takes outside torch's allocator is not counted (the nearest-code kernel: the packed
codebook, K x D fp32, and per-thread buffers of a few hundred rows).

    mmfm bench quant [--json PATH] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import base_parser, machine, parse_args, report, require_compiled, time_impls
from mmfm.ops import quant

NEAREST_CASES = [(1024, 32), (16384, 32), (16384, 8), (1024, 256)]
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2e-2}   # relative to ||z||^2 + ||e||^2


def _vqp_search():
    """vector-quantize-pytorch's distance + selection, or None when it is not installed."""
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import cdist
    except ImportError:
        return None
    return lambda z, e: (-cdist(z[None], e[None])).argmax(-1)[0]


def check_nearest(z: torch.Tensor, e: torch.Tensor, picks: dict[str, torch.Tensor], what: str,
                  chunk: int = 1024) -> dict[str, float]:
    """Each impl's pick is a nearest code within its dtype's rounding; returns {impl: same_index}.
    Distances in fp64 on the same (rounded) inputs, `chunk` rows at a time."""
    z64, e64 = z.double().cpu(), e.double().cpu()
    e_sq = (e64 * e64).sum(1)
    picks = {name: idx.reshape(-1).long().cpu() for name, idx in picks.items()}
    for start in range(0, z64.shape[0], chunk):
        zc = z64[start:start + chunk]
        d = (zc * zc).sum(1, keepdim=True) - 2 * zc @ e64.t() + e_sq
        best = d.min(1).values
        tol = ROUNDING[z.dtype] * ((zc * zc).sum(1) + e_sq.max())
        rows = torch.arange(zc.shape[0])
        for name, idx in picks.items():
            excess = d[rows, idx[start:start + chunk]] - best
            if not bool((excess <= tol).all()):
                worst = int(excess.argmax())
                raise AssertionError(f"{what}: impl {name} picked code {int(idx[start + worst])} for row "
                                     f"{start + worst}, {float(excess[worst]):.3g} farther than the nearest "
                                     f"(rounding allows {float(tol[worst]):.3g})")
    return {name: float((idx == picks["mmfm"]).double().mean()) for name, idx in picks.items()}


def bench_nearest(N: int, K: int, D: int, dtype: torch.dtype, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g).to(device, dtype)
    e = torch.randn(K, D, generator=g).to(device, dtype)
    case = {"op": "nearest_code", "N": N, "K": K, "D": D, "dtype": str(dtype).replace("torch.", ""), "device": device}
    impls = {
        "mmfm": lambda: quant.nearest_code(z, e)[0],
        "torch_cdist": lambda: torch.cdist(z, e).argmin(1),
        "reference": lambda: quant.nearest_code_reference(z, e)[0],
    }
    vqp = _vqp_search()
    if vqp is not None:
        impls["vector_quantize_pytorch"] = lambda: vqp(z, e)
    what = f"quant nearest_code N={N} K={K} D={D} {case['dtype']}"
    with torch.no_grad():
        same = check_nearest(z, e, {name: fn() for name, fn in impls.items()}, what)
    require_compiled(impls["mmfm"], what)
    records = time_impls("quant", case, impls, device, repeats)
    for r in records:
        r["same_index"] = same[r["impl"]]
    return records


def _as_tuple(out) -> tuple:
    """A tuple of tensors; scalars returned separately are stacked (lfq_entropy's reference
    returns them as one tensor [2])."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if all(t.dim() == 0 for t in out):
        return (torch.stack(list(out)),)
    return tuple(out)


def _check_outputs(outs: dict[str, object], what: str) -> None:
    """mmfm's outputs (a tensor or a tuple of them) against the reference's: floats within 1e-3,
    integer tensors (indices) equal on at least 99.9% of entries (near-ties may go either way)."""
    ref, got = (_as_tuple(outs["reference"]), _as_tuple(outs["mmfm"]))
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise AssertionError(f"{what}: output {i} has shape {tuple(b.shape)}, reference {tuple(a.shape)}")
        if a.is_floating_point():
            if not torch.allclose(b.float(), a.float(), atol=1e-3, rtol=1e-3):
                raise AssertionError(f"{what}: output {i} differs from the reference by up to "
                                     f"{float((b.float() - a.float()).abs().max()):.3g}")
        elif float((a == b).double().mean()) < 0.999:
            raise AssertionError(f"{what}: output {i} (indices) equals the reference on only "
                                 f"{float((a == b).double().mean()):.2%} of entries")


def _pair(op: str, case: dict, mmfm_fn, ref_fn, device: str, repeats: int, memory: bool = True) -> list[dict]:
    impls = {"mmfm": mmfm_fn, "reference": ref_fn}
    what = f"quant {op}"
    with torch.no_grad():
        _check_outputs({name: fn() for name, fn in impls.items()}, what)
    require_compiled(mmfm_fn, what)
    return time_impls("quant", {"op": op, **case, "device": device}, impls, device, repeats, memory=memory)


def bench_elementwise(N: int, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    levels = [8, 5, 5, 5]
    z = torch.randn(N, 4, generator=g).to(device)
    lv = quant.as_levels(levels)
    out += _pair("fsq_quantize", {"N": N, "levels": "8-5-5-5"}, lambda: quant.fsq_quantize(z, levels),
                 lambda: quant.fsq_quantize_reference(z, lv), device, repeats, memory=False)
    zl = torch.randn(N, 16, generator=g).to(device)
    zs = zl[:4096, :12].contiguous()
    out += _pair("lfq_entropy_exact", {"N": zs.shape[0], "d": 12}, lambda: quant.lfq_entropy(zs, 1.0, True),
                 lambda: quant.lfq_entropy_reference(zs, 1.0, True), device, repeats)
    x = torch.randn(N, 32, generator=g).to(device)
    idx = torch.randint(0, 1024, (N,), generator=g).to(device)
    out += _pair("code_stats", {"N": N, "K": 1024, "D": 32}, lambda: quant.code_stats(x, idx, 1024),
                 lambda: quant.code_stats_reference(x, idx, 1024), device, repeats, memory=False)
    cbs = torch.randn(8, 1024, 32, generator=g).to(device)
    out += _pair("residual_vq", {"N": N, "M": 8, "K": 1024, "D": 32}, lambda: quant.residual_vq(x, cbs),
                 lambda: quant.residual_vq_reference(x, cbs), device, repeats)
    return out


def main(argv=None) -> int:
    p = base_parser("quant", __doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=16384, help="rows searched (default 16384; 1024 with --quick)")
    p.add_argument("--cases", default=None, help="nearest-code cases as K:D,K:D (default "
                   + ",".join(f"{k}:{d}" for k, d in NEAREST_CASES) + "; bf16 runs K=16384, D=32)")
    p.add_argument("--no-others", action="store_true", help="only the nearest-code search")
    args = parse_args(p, argv)
    if args is None:
        return 2
    device = args.device
    N = 1024 if args.quick else args.N
    if args.cases:
        try:
            cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
            assert all(len(c) == 2 for c in cases)
        except (ValueError, AssertionError):
            p.error(f"--cases must be K:D pairs separated by commas, e.g. 16384:32,1024:256; got {args.cases!r}")
    else:
        cases = [(64, 8), (256, 32)] if args.quick else NEAREST_CASES
    repeats = 1 if args.quick else args.repeats
    print(f"# quant benchmark on {machine()}", file=sys.stderr)
    if _vqp_search() is None:
        print("# vector-quantize-pytorch is not installed: no vector_quantize_pytorch records", file=sys.stderr)
    records: list[dict] = []
    for K, D in cases:
        records += bench_nearest(N, K, D, torch.float32, device, repeats)
    records += bench_nearest(N, 256 if args.quick else 16384, 32, torch.bfloat16, device, repeats)
    if not args.no_others:
        records += bench_elementwise(N, device, repeats)
    return report(records, args.json, figures=("ms", "cpu_ms", "peak_extra_mb", "same_index"),
                  ratio_to="torch_cdist")


if __name__ == "__main__":
    sys.exit(main())
