"""Quality against forward passes: digit accuracy of generated images (the prompt eval's digit
scorer, mmfm/eval) for MaskGIT decoding of a masked-trained export at several step counts, beside
AR decoding of an AR-trained export (one pass per image token). docs/benchmarks.md, issue 18.

    python tools/masked_curve.py --masked runs/masked/export --ar runs/ar/export --corpus runs/demo/corpus \
        --n 100 --seeds 0 1 --steps 2 4 8 16 --json curve.json --plot curve.png

--hybrid EXPORT adds a model trained with the hybrid (BAMM) objective, decoded three ways: AR (its
causal half), MaskGIT under the hybrid attention at --steps, and BAMM's cascade (the causal draft,
then --refine of its least confident tokens regenerated in --cascade-steps masked passes).

Both exports must share the vocabulary and tokenizers (one PromptEval scores both). Each
(decoder, seed) draws one image per prompt; the accuracy is over all seeds' images, with its
binomial standard error sqrt(p (1 - p) / images).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from mmfm.jsonio import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masked", required=True, help="export trained with objective.kind masked (or hybrid)")
    p.add_argument("--ar", default=None, help="export trained with objective.kind ar on the same data")
    p.add_argument("--hybrid", default=None, help="export trained with objective.kind hybrid on the same data")
    p.add_argument("--refine", type=float, default=0.3, help="--hybrid's cascade: share of the draft regenerated")
    p.add_argument("--cascade-steps", type=int, default=4, help="--hybrid's cascade: masked refinement passes")
    p.add_argument("--corpus", required=True, help="the demo corpus the digit scorer is fitted on")
    p.add_argument("--cache-dir", default=None, help="fitted scorers (default <corpus>/.scorers)")
    p.add_argument("--n", type=int, default=100, help="digit prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, nargs="*", default=[2, 4, 8, 16], help="MaskGIT step counts (none: only --ar)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="a PNG of accuracy against forward passes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from mmfm.eval.gen import Sampling, load_export
    from mmfm.eval.runner import PromptEval

    torch.set_num_threads(args.threads)
    masked, vocab, toks = load_export(args.masked)
    ev = PromptEval(args.corpus, vocab, toks, n=args.n, modalities=["image"], cache_dir=args.cache_dir)
    ev.sets.pop("scenes", None)     # the digit task only: the claim is about one scored quantity
    length = ev.toks.segment_length("image")
    # (model name, model, Sampling settings, forward passes per image)
    runs = [("masked", masked, dict(decode="masked", steps=s), s) for s in args.steps]
    for flag in ("ar", "hybrid"):
        path = getattr(args, flag)
        if not path:
            continue
        model, other, _ = load_export(path)
        if other.size != vocab.size:
            raise SystemExit(f"--{flag} {path}: vocabulary size {other.size} differs from --masked's {vocab.size}")
        runs.append((flag, model, dict(decode="ar"), length))
        if flag == "hybrid":
            runs += [("hybrid", model, dict(decode="masked", steps=s, hybrid=True), s) for s in args.steps]
            k = round(args.refine * length)
            runs.append(("hybrid", model, dict(decode="cascade", steps=args.cascade_steps, refine=args.refine),
                         length + min(args.cascade_steps, k)))
    rows = []
    for name, model, settings, passes in runs:
        hits, total, t0 = 0.0, 0, time.perf_counter()
        for seed in args.seeds:
            ev.cfg.sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=seed, batch_size=args.n,
                                       **settings)
            acc = ev.run(model)["image/digit"]
            hits += acc * args.n
            total += args.n
        acc = hits / total
        row = {"model": name, "decode": settings["decode"], "passes": passes, "accuracy": acc,
               "se": math.sqrt(acc * (1 - acc) / total), "images": total, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = {r["impl"]: r["accuracy"] for r in ev.reference if r["case"]["task"] == "digit"}
    print(json.dumps({"chance": ref.get("chance"), "ceiling": ref.get("ceiling")}))
    if args.json:
        write_json(args.json, {"rows": rows, "reference": ref, "args": vars(args)})
    if args.plot:
        from mmfm.tokenizers.render import multi_line_plot

        labels = {("masked", "masked"): "masked model, MaskGIT", ("ar", "ar"): "AR model, AR",
                  ("hybrid", "ar"): "hybrid model, AR", ("hybrid", "masked"): "hybrid model, MaskGIT",
                  ("hybrid", "cascade"): "hybrid model, cascade"}
        series = {}
        for r in rows:
            series.setdefault(labels[r["model"], r["decode"]], []).append((r["passes"], r["accuracy"]))
        if ref.get("chance") is not None:
            series["chance"] = [(1, ref["chance"]), (length, ref["chance"])]
        multi_line_plot(args.plot, {k: v for k, v in series.items() if v},
                        "digit accuracy vs forward passes per image", "forward passes", "accuracy")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
