"""Perturbed reconstruction of image tokenizers side by side (RobustTok's pFID, here PSNR and the eval's
digit-scorer accuracy; mmfm/tokenizers/robust.py), for docs/benchmarks.md "Robust latents".

    python tools/robust_latents.py --corpus runs/demo/corpus --tokenizer base=DIR --tokenizer robust=DIR \
        [--fractions 0.05,0.1,0.2] [--neighbours K] [--n 200] [--cache-dir DIR] [--json PATH]

For each tokenizer and each share f of tokens replaced (0 = clean; the same positions and draws for
every tokenizer): PSNR over the corpus' held-out images (at most --n), and the accuracy of the eval's
digit scorer (mmfm eval prompts' own, fitted on that tokenizer's round trips of the training digits)
on the held-out digits decoded from perturbed tokens: how much a wrong token costs what the prompt
eval measures.
"""
from __future__ import annotations

import argparse
import sys

from mmfm.jsonio import write_records


def main(argv=None) -> int:
    import torch

    from mmfm.eval import cache
    from mmfm.eval.promptsets import Corpus, build_set
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.metrics import psnr
    from mmfm.tokenizers.robust import fraction_label, perturbed_reconstructions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--fractions", default="0.05,0.1,0.2")
    ap.add_argument("--neighbours", type=int, default=0)
    ap.add_argument("--n", type=int, default=200, help="held-out images for PSNR, and held-out digits")
    ap.add_argument("--cache-dir", default=None, help="fitted scorers (default <corpus>/.scorers)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    fractions = [0.0] + [float(f) for f in a.fractions.split(",") if f]
    corpus = Corpus(a.corpus)
    held = read_samples(f"{a.corpus}/image-*.tar", "image", "eval", 0.1)[:a.n]
    records = []
    for spec in a.tokenizer:
        if "=" not in spec:
            print(f"--tokenizer: expected NAME=DIR, got {spec!r}", file=sys.stderr)
            return 2
        name, folder = spec.split("=", 1)
        tok = load_tokenizer(folder).eval()
        x = prepare_all(tok, held)
        ps = build_set(corpus, "digits", a.n)
        scorer = cache.scorer("digits", ps.train, corpus.folder, a.cache_dir, tok)
        digits = torch.stack([tok.prepare(it.sample) for it in ps.items])
        want = [it.labels["digit"] for it in ps.items]
        recon = perturbed_reconstructions(tok, x, fractions, neighbours=a.neighbours)
        drecon = perturbed_reconstructions(tok, digits, fractions, neighbours=a.neighbours)
        for f in fractions:
            pred = scorer.predict(list(drecon[f]))["digit"]
            records.append({"bench": "robust_latents", "case": {"tokenizer": name, "replaced": fraction_label(f)},
                            "impl": "mmfm", "psnr": psnr(x, recon[f]),
                            "digit_accuracy": sum(p == w for p, w in zip(pred, want)) / len(want),
                            "images": x.shape[0], "digits": len(want), "neighbours": a.neighbours})
    print("tokenizer  replaced  psnr    digit_accuracy")
    for r in records:
        print(f"{r['case']['tokenizer']:<10} {r['case']['replaced']:<9} {r['psnr']:<7.2f} {r['digit_accuracy']:.3f}")
    write_records(records, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
