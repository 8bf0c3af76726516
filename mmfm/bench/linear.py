"""Benchmark of decode_linear (csrc/linear): every matmul of one decode step (n = 1 row) or one
draft-tree pass (n = 4, 12, 20 rows) of a dense Transformer, through the compiled op on packed
weights (impl `mmfm`), its portable loop (`mmfm_generic`: the kernel of builds without AVX2), and
torch (`torch_flinear`: torch.mm / addmm on F.linear's [out, in] storage seen through .t(), what
DenseStep ran before the op; `torch_contig`: the same on a contiguous [in, out] copy, the faster
torch layout on CPU), side by side in one process. Every impl computes, per layer,
qkv = s(x) * (x @ Wqkv), x = x + a @ Wo, gu = s(x) * (x @ Wgu), x = x + h @ Wdown, then the head
s(x) * (x @ Whead), where s(x) = rsqrt(sum(x^2) + dim * eps); the activations are fixed random
tensors made before the timing (attention, rotary and the nonlinearity are not timed).

One timed call is one whole step's matmuls, over one weight set per layer, so the working set is
a model's (default: the `--preset long` demo model, dim 192, 6 layers, 6/2 heads of 32, ffn 512,
V 2909: 14 MB of weights) and weights come from wherever a model's weights come from between
steps on this machine: decoding reads every layer once per step. --layers scales that.

Before timing, every impl's output must equal `torch_flinear`'s within float32 rounding
(atol 1e-4 relative to the outputs' scale), and the mmfm impl must run torch.ops.mmfm.decode_linear.
Times: per call, the median over --repeats rounds, each round timing every impl in turn. The
ratio column is the fastest torch impl's time over this impl's (a speed-up above 1).

    mmfm bench linear [--json PATH] [--quick] [--rows 1 4 12 20] [--dim 192] [--layers 6] ...
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import base_parser, by_case, check_agree, interleaved, machine, parse_args, record, report, \
    require_compiled
from mmfm.ops import linear as L

TORCH_IMPLS = ("torch_flinear", "torch_contig")


def model_weights(dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int, layers: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (Wqkv, Wo, Wgu, Wdown) as F.linear stores them ([out, in]), then the head alone."""
    g = torch.Generator().manual_seed(seed)
    w = lambda o, i: torch.randn(o, i, generator=g) / i ** 0.5   # noqa: E731
    out = [(w((heads + 2 * kv_heads) * head_dim, dim), w(dim, heads * head_dim), w(2 * ffn, dim), w(dim, ffn))
           for _ in range(layers)]
    out.append((w(vocab, dim),))
    return out


def step_fn(weights, acts, eps: float, prep, generic: bool = False):
    """One step's matmuls with weights prepared by `prep` ([in, out] view -> what decode_linear takes)."""
    layers = [tuple(prep(m.t()) for m in ws) for ws in weights[:-1]]
    head = prep(weights[-1][0].t())
    x0, a, h = acts

    def run():
        x = x0
        for wqkv, wo, wgu, wdown in layers:
            L.decode_linear(x, wqkv, eps, generic=generic)
            x = L.decode_linear(a, wo, residual=x, generic=generic)
            L.decode_linear(x, wgu, eps, generic=generic)
            x = L.decode_linear(h, wdown, residual=x, generic=generic)
        return L.decode_linear(x, head, eps, generic=generic)
    return run


def bench_rows(n: int, weights, dims: dict, repeats: int, inner: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + n)
    dim, hd_all, ffn = dims["dim"], dims["heads"] * dims["head_dim"], dims["ffn"]
    acts = (torch.randn(n, dim, generator=g), torch.randn(n, hd_all, generator=g), torch.randn(n, ffn, generator=g))
    eps = dim * 1e-5
    torch_view = lambda w: L.PackedLinear(*w.shape, weight=w)                 # noqa: E731
    torch_contig = lambda w: L.PackedLinear(*w.shape, weight=w.contiguous())  # noqa: E731
    packed = lambda w: L.PackedLinear(*w.shape, packed=L.pack_panels(w))      # noqa: E731
    impls = {
        "torch_flinear": step_fn(weights, acts, eps, torch_view),
        "torch_contig": step_fn(weights, acts, eps, torch_contig),
        "mmfm": step_fn(weights, acts, eps, packed),
    }
    impls["mmfm_generic"] = step_fn(weights, acts, eps, packed, generic=True)
    case = {"op": "decode_step_matmuls", "rows": n, "dim": dim, "layers": len(weights) - 1, "vocab": dims["vocab"]}
    with torch.no_grad():
        outs = {name: fn() for name, fn in impls.items()}
        scale = float(outs["torch_flinear"].abs().max())
        check_agree(outs, f"linear rows={n}", atol=1e-4 * scale, rtol=1e-4)
        require_compiled(impls["mmfm"], f"linear rows={n}")
        times = interleaved(impls, "cpu", repeats, inner)
    return [record("linear", case, name, **t) for name, t in times.items()]


def summary(records: list[dict]) -> list[str]:
    lines = []
    cpu = by_case(records, "cpu_ms")
    for key, t in by_case(records).items():
        base = min(TORCH_IMPLS, key=lambda n: t[n])
        lines.append(f"{key}: mmfm {t[base] / t['mmfm']:.2f}x the fastest torch layout ({base}: {t[base]:.3f} ms vs "
                     f"mmfm {t['mmfm']:.3f} ms per step's matmuls; CPU time {cpu[key][base] / cpu[key]['mmfm']:.2f}x); "
                     f"{t['torch_flinear'] / t['mmfm']:.2f}x torch_flinear (DenseStep before the op)")
    one = {r["case"]["rows"]: r["ms"] for r in records if r["impl"] == "mmfm"}
    if 1 in one:
        lines.append("mmfm, a tree pass's matmuls against one step's: " +
                     ", ".join(f"{n} rows {ms / one[1]:.2f}x" for n, ms in sorted(one.items()) if n != 1))
    return lines


def main(argv=None) -> int:
    p = base_parser("linear", __doc__.split("\n\n")[0], threads_help="default: torch's; decode benchmarks use 1")
    p.add_argument("--rows", type=int, nargs="*", help="rows per call (default 1 4 12 20)")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2909)
    p.add_argument("--layers", type=int, default=6)
    args = parse_args(p, argv, cpu_only="what the op is for (CUDA tensors go to torch.mm)")
    if args is None:
        return 2
    rows = args.rows or ([1, 4] if args.quick else [1, 4, 12, 20])
    if any(n < 1 for n in rows):
        print(f"mmfm bench linear: --rows must be >= 1, got {rows}", file=sys.stderr)
        return 2
    dims = dict(dim=args.dim, heads=args.heads, head_dim=args.head_dim, ffn=args.ffn, vocab=args.vocab)
    layers = 2 if args.quick else args.layers
    weights = model_weights(args.dim, args.heads, args.kv_heads, args.head_dim, args.ffn, args.vocab, layers)
    mb = sum(w.numel() for ws in weights for w in ws) * 4 / 1e6
    print(f"# linear benchmark on {machine()}; kernel {L.decode_linear_isa()}; {layers} layers + head, "
          f"{mb:.1f} MB of weights", file=sys.stderr)
    repeats = 1 if args.quick else args.repeats
    records: list[dict] = []
    for n in rows:
        records += bench_rows(n, weights, dims, repeats, 1 if args.quick else 20)
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms"), ratio_to=TORCH_IMPLS)


if __name__ == "__main__":
    sys.exit(main())
