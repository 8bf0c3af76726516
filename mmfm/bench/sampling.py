"""Benchmark of fused sampling: the compiled op (impl `mmfm`), the pure-torch sort-based
reference (`reference`), Hugging Face transformers' logits warpers + softmax + multinomial
(`hf_warpers`, when transformers is installed) and the floor `logits.max(-1)` (`floor`: one
read of the logits), for the modes

    topk_topp  temperature 0.8, top_k 50, top_p 0.9    (HF: Temperature + TopK + TopP warpers)
    min_p      temperature 1.0, min_p 0.05             (HF: MinPLogitsWarper)
    typical    typical_p 0.9                           (HF: TypicalLogitsWarper)

on logits drawn from 2 * N(0, 1) (fp32). Every impl returns one token per row.

    mmfm bench sampling [--json PATH] [--device cpu|cuda] [--quick] [--V 128256] [--B 8]
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import base_parser, by_case, machine, parse_args, report, time_impls
from mmfm.ops import sampling

MODES = {
    "topk_topp": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "typical": dict(typical_p=0.9),
}
GRID_V = (32000, 128256, 256000)
GRID_B = (1, 8, 64)


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


def bench_case(V: int, B: int, mode: str, device: str, repeats: int, with_reference: bool) -> list[dict]:
    g = torch.Generator().manual_seed(V + B)
    logits = (2.0 * torch.randn(B, V, generator=g)).to(device)
    input_ids = torch.zeros(B, 1, dtype=torch.int64, device=device)
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
    impls["floor"] = lambda: logits.max(-1)
    return time_impls("sampling", case, impls, device, repeats)


def summary(records: list[dict]) -> list[str]:
    """One line per case: speed-up of mmfm over hf_warpers and its ratio to the floor."""
    lines = []
    for key, t in by_case(records).items():
        if "mmfm" not in t:
            continue
        parts = [key]
        if "hf_warpers" in t:
            parts.append(f"{t['hf_warpers'] / t['mmfm']:.1f}x faster than hf_warpers")
        if "floor" in t:
            parts.append(f"{t['mmfm'] / t['floor']:.2f}x the floor")
        lines.append(", ".join(parts))
    return lines


def main(argv=None) -> int:
    p = base_parser("sampling", __doc__.split("\n\n")[0])
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
    return report(records, args.json, summary(records), ratio_to="hf_warpers")


if __name__ == "__main__":
    sys.exit(main())
