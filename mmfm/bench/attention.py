"""Benchmark of decode_attention (csrc/attention): one layer's attention for a decode step (n = 1
query per row, every row at the same length or ragged) or a draft tree (n nodes of one row,
ancestor mask), against a cache layer [B, Hkv, T, hd] of the long export's shape (6 / 2 heads of
32), through the compiled op (impl `mmfm`), its portable loop (`mmfm_generic`), and torch's
scaled_dot_product_attention as DenseStep called it before the op (`torch_sdpa`: the cache
narrowed to the visible length; no mask for equal rows, a bool mask for ragged rows, an
additive float mask for trees, built before the timing). The new keys are already in the cache,
as in the step. Every impl's output is checked against the reference before timing, and the mmfm
impl must run torch.ops.mmfm.decode_attention. Times: medians over --repeats interleaved rounds.

    mmfm bench attention [--json PATH] [--quick] [--threads N]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from mmfm.bench.common import base_parser, by_case, check_agree, interleaved, machine, parse_args, record, report, \
    require_compiled
from mmfm.ops import attention as A


def bench_case(kind: str, B: int, n: int, L: int, H: int, Hkv: int, hd: int, repeats: int, inner: int) -> list[dict]:
    g = torch.Generator().manual_seed(L + n + B)
    T = L + n + 16
    k, v = torch.randn(B, Hkv, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    q = torch.randn(B, n, H, hd, generator=g)
    if kind == "ragged_step":
        prefix = torch.randint(L // 2, L + 1, (B,), generator=g)
        prefix[0] = L
    else:
        prefix = torch.full((B,), L, dtype=torch.long)
    upto = int(prefix.max()) + n
    mask = None
    if kind == "tree":   # a random tree: each node's parent is an earlier node
        parent = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[parent[i]]
    qt = q.transpose(1, 2)
    if kind == "tree":
        attn = torch.zeros(1, 1, n, upto)
        attn[..., L:].masked_fill_(~mask, float("-inf"))
    elif kind == "ragged_step":
        attn = A.visible_mask(prefix, n, upto, None)
    else:
        attn = None
    kn, vn = k.narrow(2, 0, upto), v.narrow(2, 0, upto)
    impls = {
        "torch_sdpa": lambda: F.scaled_dot_product_attention(qt, kn, vn, attn_mask=attn, enable_gqa=H != Hkv),
        "mmfm": lambda: A.decode_attention(q, k, v, prefix, mask),
        "mmfm_generic": lambda: A.decode_attention(q, k, v, prefix, mask, generic=True),
    }
    case = {"op": kind, "B": B, "n": n, "keys": L, "H": H, "Hkv": Hkv, "hd": hd}
    with torch.no_grad():
        ref = A.decode_attention_reference(q, k, v, prefix, mask)
        outs = {"reference": ref, "torch_sdpa": impls["torch_sdpa"]().transpose(1, 2),
                "mmfm": impls["mmfm"](), "mmfm_generic": impls["mmfm_generic"]()}
        check_agree(outs, f"attention {kind}", atol=1e-5, rtol=1e-5)
        require_compiled(impls["mmfm"], f"attention {kind}")
        times = interleaved(impls, "cpu", repeats, inner)
    return [record("attention", case, name, **t) for name, t in times.items()]


def summary(records: list[dict]) -> list[str]:
    lines = []
    for key, t in by_case(records).items():
        lines.append(f"{key}: mmfm {t['torch_sdpa'] / t['mmfm']:.2f}x torch_sdpa ({t['torch_sdpa'] * 1e3:.1f} us vs "
                     f"{t['mmfm'] * 1e3:.1f} us per call)")
    return lines


def main(argv=None) -> int:
    p = base_parser("attention", __doc__.split("\n\n")[0], threads_help="default: torch's; decode benchmarks use 1")
    args = parse_args(p, argv, cpu_only="what the op is for (CUDA tensors go to torch's SDPA)")
    if args is None:
        return 2
    H, Hkv, hd = 6, 2, 32
    cases = [("step", 1, 1, 260), ("step", 1, 1, 1000), ("ragged_step", 8, 1, 260), ("tree", 1, 4, 260),
             ("tree", 1, 12, 260), ("tree", 1, 20, 260)]
    if args.quick:
        cases = [("step", 1, 1, 40), ("ragged_step", 3, 1, 40), ("tree", 1, 5, 40)]
    print(f"# attention benchmark on {machine()}", file=sys.stderr)
    records: list[dict] = []
    for kind, B, n, L in cases:
        records += bench_case(kind, B, n, L, H, Hkv, hd, 1 if args.quick else args.repeats, 1 if args.quick else 200)
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms"), ratio_to="torch_sdpa")


if __name__ == "__main__":
    sys.exit(main())
