"""SuperBPE against BPE at the same vocabulary size on held-out text (docs/benchmarks.md, "## tokenizer").

    python -m mmfm.tokenizers.text_compare --shards 'runs/demo-corpus/text-*.tar' --vocab-size 2000 \\
        --transitions 2000,1800,1600
    python -m mmfm.tokenizers.text_compare --files '/usr/lib/python3.11/**/*.py' --max-train-bytes 3000000 ...

Text comes from text shards (the config's held-out split rule, mmfm/tokenizers/data.py) or from
files (a file is held out when its path relative to the glob's root hashes into --holdout; whole
files, so held-out text shares no file with training). For each transition t the SuperBPE tokenizer
(t == vocab size: plain BPE, the same code and pretokenization) is trained on the training text
and measured on the held-out text: bytes per token and tokens per byte. Prints a table; --json
writes the records (bench "tokenizer_text").
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time


def read_files(pattern: str, holdout: float, max_train_bytes: int) -> tuple[list[str], list[str]]:
    from mmfm.tokenizers.data import is_held_out

    root = pattern.split("*", 1)[0]
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise FileNotFoundError(f"--files: no file matches {pattern!r}")
    train, held, n = [], [], 0
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if is_held_out(os.path.relpath(p, root), holdout):
            held.append(text)
        elif not max_train_bytes or n < max_train_bytes:
            train.append(text)
            n += len(text.encode())
    return train, held


def compare(train: list[str], held: list[str], vocab_size: int, transitions: list[int], name: str) -> list[dict]:
    from mmfm.tokenizers.superbpe import SuperBPEConfig, SuperBPETokenizer

    n_bytes = sum(len(t.encode()) for t in held)
    recs = []
    for t in transitions:
        t0 = time.time()
        tok = SuperBPETokenizer(SuperBPEConfig(vocab_size=vocab_size, transition_vocab_size=t)).fit(train)
        n_tokens = sum(len(tok.encode(h)) for h in held)
        recs.append({"bench": "tokenizer_text", "case": {"tokenizer": name, "vocab_size": vocab_size},
                     "impl": "bpe" if t == vocab_size else f"superbpe_t{t}", "transition": t,
                     "vocab_size": tok.vocab_size, "bytes_per_token": n_bytes / n_tokens,
                     "tokens_per_byte": n_tokens / n_bytes, "heldout_bytes": n_bytes, "heldout_tokens": n_tokens,
                     "train_bytes": sum(len(x.encode()) for x in train), "train_s": round(time.time() - t0, 1)})
        print(recs[-1], file=sys.stderr, flush=True)
    base = next((r for r in recs if r["impl"] == "bpe"), None)
    for r in recs:
        r["tokens_vs_bpe"] = r["heldout_tokens"] / base["heldout_tokens"] if base else None
    return recs


def main(argv=None) -> int:
    from mmfm.jsonio import write_records
    from mmfm.tokenizers.commands import print_records

    p = argparse.ArgumentParser(prog="python -m mmfm.tokenizers.text_compare", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="text shards (held-out split by key hash, as mmfm tokenizer eval)")
    src.add_argument("--files", help="a recursive glob of text files (held-out split by path hash)")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--max-train-bytes", type=int, default=0, help="files: stop adding training files after this")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--transitions", default="", help="comma-separated t values (default: V, 0.9 V, 0.8 V)")
    p.add_argument("--name", default="", help="the text's name in the records")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    v = a.vocab_size
    ts = [int(x) for x in a.transitions.split(",")] if a.transitions else [v, int(0.9 * v), int(0.8 * v)]
    if a.shards:
        from mmfm.tokenizers.data import read_samples

        train = [s["txt"] for s in read_samples(a.shards, "text", "train", a.holdout) if isinstance(s.get("txt"), str)]
        held = [s["txt"] for s in read_samples(a.shards, "text", "eval", a.holdout) if isinstance(s.get("txt"), str)]
    else:
        train, held = read_files(a.files, a.holdout, a.max_train_bytes)
    if not train or not held:
        print(f"text_compare: {len(train)} training and {len(held)} held-out texts; need both", file=sys.stderr)
        return 2
    recs = compare(train, held, v, ts, a.name or (a.shards or a.files))
    print_records(recs, key=lambda r: str(r["case"]["vocab_size"]))
    write_records(recs, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
