"""What the eval's image scorers read after an image tokenizer's round trip, without training a model:
the ceiling an image tokenizer puts on `mmfm eval prompts` (digit class; scene colour, shape, position).

    python tools/image_tokenizer_ceilings.py --corpus runs/demo/corpus --tokenizer runs/demo/tokenizers/image/tokenizer [--n 100]

Prints, per task, the scorer's accuracy on the prompts' real samples after the round trip and on
the samples themselves (raw), on the same held-out prompt sets the eval uses.
"""
from __future__ import annotations

import argparse
import sys

import torch


def ceilings(corpus_folder: str, tokenizer_folder: str, n: int = 100) -> dict:
    from mmfm.eval import cache
    from mmfm.eval.promptsets import Corpus, build_set
    from mmfm.eval.runner import accuracy
    from mmfm.tokenizers.base import load_tokenizer

    corpus, tok = Corpus(corpus_folder), load_tokenizer(tokenizer_folder)
    if tok.modality != "image":
        raise ValueError(f"--tokenizer {tokenizer_folder!r}: a {tok.modality} tokenizer; expected an image one")
    out = {}
    for name in ("digits", "scenes"):
        ps = build_set(corpus, name, n)
        scorer = cache.scorer(name, ps.train, corpus.folder, "", tok)   # fitted as the eval fits it
        x = torch.stack([tok.prepare(it.sample) for it in ps.items]).float()
        with torch.no_grad():
            rt = torch.cat([tok.decode(tok.encode_batch(x[i:i + 32])) for i in range(0, len(x), 32)])
        got, raw = scorer.predict(list(rt)), scorer.predict(list(x))
        for t in ps.tasks:
            want = [it.labels[t] for it in ps.items]
            out[f"{name}.{t}"] = {"round_trip": accuracy(got[t], want), "raw": accuracy(raw[t], want), "n": len(want)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="a demo corpus folder (mmfm data demo)")
    ap.add_argument("--tokenizer", required=True, help="a saved image tokenizer folder")
    ap.add_argument("--n", type=int, default=100, help="prompts per set")
    a = ap.parse_args(argv)
    for task, r in ceilings(a.corpus, a.tokenizer, a.n).items():
        print(f"{task:16s} round trip {r['round_trip']:.2f}   raw {r['raw']:.2f}   n={r['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
