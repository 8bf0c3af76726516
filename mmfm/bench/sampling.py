"""Benchmark of fused sampling: one token per row from fp32 logits 2 * N(0, 1), for the modes

    topk_topp  temperature 0.8, top_k 50, top_p 0.9    (HF: Temperature + TopK + TopP warpers)
    min_p      temperature 1.0, min_p 0.05             (HF: Temperature + MinPLogitsWarper)
    typical    typical_p 0.9                           (HF: TypicalLogitsWarper)

Impls, each timed on the same logits, per call:
    mmfm            mmfm.ops.sampling.sample, the compiled kernel (seeded Philox draw)
    reference       the pure-torch sort-based sample_reference (skip with --no-reference)
    hf_warpers      transformers' warpers as generate() chains them, softmax, torch.multinomial
    torch_topk      (topk_topp) what a careful torch user writes: torch.topk(k) first, then
                    softmax, cumsum and the top-p cut within the k survivors, multinomial, gather
    torch_min_p     (min_p) softmax, zero below min_p * max, multinomial: no sort
    floor_sum       logits.sum(-1): one streaming read of the logits
    floor_copy      a memcpy of the logits into a preallocated buffer (reads and writes them)
The summary's floor is the faster of the two floors: no sampler can beat one read of its input.

Before timing, each sampling impl draws from the same logits and every token must lie in the
support of the mode's distribution (processed_probs_reference > 0), and the mmfm impl must have
dispatched a torch.ops.mmfm op (mmfm/bench/common.py). Timing: --repeats rounds, each round
timing every impl once in turn, so that load from other processes falls on all alike; `ms` is
the median wall time, `cpu_ms` the median process CPU time (with --threads 1 on a busy machine,
CPU time excludes the waits for a core that wall time includes: the cross-check the docs cite).

    mmfm bench sampling [--json PATH] [--device cpu|cuda] [--quick] [--V 128256] [--B 8] [--threads 1]
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import base_parser, by_case, machine, parse_args, report, require_compiled, time_impls
from mmfm.ops import sampling

MODES = {
    "topk_topp": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "typical": dict(typical_p=0.9),
}
GRID_V = (32000, 128256, 256000)
GRID_B = (1, 8, 64)
FLOORS = ("floor_sum", "floor_copy")


def hf_warpers(mode: str):
    """The transformers path: warpers as generate() chains them, then softmax + multinomial."""
    try:
        import transformers as tf
    except ImportError:
        return None
    p = MODES[mode]
    if mode == "topk_topp":
        warpers = [tf.TemperatureLogitsWarper(p["temperature"]), tf.TopKLogitsWarper(p["top_k"]),
                   tf.TopPLogitsWarper(p["top_p"])]
    elif mode == "min_p":
        warpers = [tf.TemperatureLogitsWarper(p["temperature"]), tf.MinPLogitsWarper(p["min_p"])]
    else:
        warpers = [tf.TypicalLogitsWarper(p["typical_p"])]

    def run(logits: torch.Tensor, input_ids: torch.Tensor):
        scores = logits
        for w in warpers:
            scores = w(input_ids, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)

    return run


def torch_topk_topp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k first (torch.topk returns the k largest, sorted), then top-p within the k survivors:
    keep the head whose mass before each token is below top_p (the token that reaches top_p is
    kept), draw among them. The same kept set as mmfm's top_k + top_p."""
    vals, idx = torch.topk(logits, top_k, dim=-1)
    probs = torch.softmax(vals * (1.0 / temperature), dim=-1)
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    return idx.gather(1, torch.multinomial(probs, 1)).squeeze(1)


def torch_min_p(logits: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits * (1.0 / temperature), dim=-1)
    probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1).squeeze(1)


def check_support(impls: dict, logits: torch.Tensor, params: dict, what: str, draws: int = 4) -> None:
    """Every sampling impl's tokens must lie where the mode's distribution is positive."""
    support = sampling.processed_probs_reference(logits, **params) > 0
    rows = torch.arange(logits.shape[0], device=logits.device)
    for name, fn in impls.items():
        if name in FLOORS:
            continue
        for _ in range(draws):
            tok = fn()
            if tok.shape != rows.shape or not bool(support[rows, tok.long()].all()):
                raise AssertionError(f"{what}: impl {name} drew a token outside the {params} support "
                                     f"(tokens {tok.tolist()[:8]})")


def bench_case(V: int, B: int, mode: str, device: str, repeats: int, with_reference: bool) -> list[dict]:
    g = torch.Generator().manual_seed(V + B)
    logits = (2.0 * torch.randn(B, V, generator=g)).to(device)
    input_ids = torch.zeros(B, 1, dtype=torch.int64, device=device)
    buf = torch.empty_like(logits)
    params = MODES[mode]
    case = {"V": V, "B": B, "mode": mode}
    if device != "cpu":
        case["device"] = device
    impls = {"mmfm": lambda: sampling.sample(logits, seed=0, **params)}
    if with_reference:
        impls["reference"] = lambda: sampling.sample_reference(logits, **params)
    hf = hf_warpers(mode)
    if hf is not None:
        impls["hf_warpers"] = lambda: hf(logits, input_ids)
    if mode == "topk_topp":
        impls["torch_topk"] = lambda: torch_topk_topp(logits, **params)
    if mode == "min_p":
        impls["torch_min_p"] = lambda: torch_min_p(logits, **params)
    impls["floor_sum"] = lambda: logits.sum(-1)
    impls["floor_copy"] = lambda: buf.copy_(logits)
    what = f"sampling V={V} B={B} {mode}"
    check_support(impls, logits, params, what)
    require_compiled(impls["mmfm"], what)
    return time_impls("sampling", case, impls, device, repeats)


def summary(records: list[dict]) -> list[str]:
    """One line per case: speed-up of mmfm over each torch/transformers path (wall, and CPU time
    in brackets) and its time over the floor."""
    wall, cpu = by_case(records), by_case(records, "cpu_ms")
    lines = []
    for key, t in wall.items():
        if "mmfm" not in t:
            continue
        c = cpu[key]
        parts = [key]
        for base in ("hf_warpers", "torch_topk", "torch_min_p"):
            if base in t:
                parts.append(f"{t[base] / t['mmfm']:.1f}x faster than {base} (CPU time {c[base] / c['mmfm']:.1f}x)")
        floors = [f for f in FLOORS if f in t]
        if floors:
            f = min(floors, key=lambda n: t[n])
            parts.append(f"{t['mmfm'] / t[f]:.2f}x the floor ({f}, "
                         f"{4 * int(key.split()[0][2:]) * int(key.split()[1][2:]) / t[f] / 1e6:.1f} GB/s read)")
        lines.append(", ".join(parts))
    return lines


def main(argv=None) -> int:
    p = base_parser("sampling", __doc__.split("\n\n")[0], threads_help="0 = torch's default")
    p.add_argument("--V", type=int, nargs="*", help=f"vocabulary sizes (default {list(GRID_V)})")
    p.add_argument("--B", type=int, nargs="*", help=f"batch sizes (default {list(GRID_B)})")
    p.add_argument("--mode", nargs="*", choices=sorted(MODES), help="modes (default all)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) sort-based reference")
    args = parse_args(p, argv)
    if args is None:
        return 2
    device = args.device
    Vs = args.V or ((1000,) if args.quick else GRID_V)
    Bs = args.B or ((2,) if args.quick else GRID_B)
    modes = args.mode or list(MODES)
    repeats = 1 if args.quick else args.repeats
    print(f"# sampling benchmark on {machine()}; logits 2 * N(0, 1) fp32", file=sys.stderr)
    if hf_warpers("typical") is None:
        print("# transformers is not installed: no hf_warpers records (pip install -c constraints.txt transformers)",
              file=sys.stderr)
    records: list[dict] = []
    for V in Vs:
        for B in Bs:
            for mode in modes:
                records += bench_case(V, B, mode, device, repeats, not args.no_reference)
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms", "peak_extra_mb"),
                  ratio_to="hf_warpers")


if __name__ == "__main__":
    sys.exit(main())
