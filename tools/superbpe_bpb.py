"""SuperBPE against BPE at the same vocabulary size: the demo model's held-out bits per byte at equal
training compute (issue 19 item 1, the second claim; docs/benchmarks.md, "## tokenizer").

    PYTHONPATH=. python tools/superbpe_bpb.py --corpus runs/demo/corpus --out runs/superbpe-bpb \
        [--arms bpe,superbpe] [--seeds 0,1] [--vocab-size 1000] [--transition 800] [--steps 500]

Per arm (a text tokenizer), with the demo's own stages (mmfm/demos/e2e.py):
  1. tokenizer   fitted on the corpus' documents (text-*.tar, train split) at --vocab-size:
                 bpe       text_superbpe with transition = vocab size: plain byte-level BPE, the same
                           code, pretokenization and data as SuperBPE (the paper's baseline)
                 superbpe  text_superbpe with transition --transition (stage 2 adds superwords)
                 spm       text_bpe_small (sentencepiece BPE, the demo's text tokenizer kind); lossy:
                           its normalization turns newlines into spaces, so its bits/byte are not
                           comparable (the report counts the documents it does not reproduce)
  2. tokens      e2e.tokenize_corpus with only the text tokenizer: documents uncut
                 (max_text_tokens huge), held out by key hash as everywhere in mmfm
  3. pretrain    configs/pretrain/demo.yaml's model and optimizer, text only (pack concat, no mix,
                 no caption dropout, no loss weights), --steps x --micro-batch x --seq-len tokens for
                 every arm: equal training compute, so an arm whose tokens hold more bytes trains on
                 more text (the SuperBPE paper's comparison); one process per run (its own DeepSpeed init)
  4. bits/byte   mmfm.eval.bits_per_byte on the export over the held-out documents, with windows
                 of the training --seq-len (stride half of it)
Writes <out>/summary.json and prints a markdown table (mean and spread over seeds). Every stage is
skipped when its output exists, so a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

ARMS = ("bpe", "superbpe", "spm")
HUGE = 1 << 30   # max_text_tokens: a document is never cut


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tokenizer_config(arm: str, args):
    from mmfm.tokenizers.config import load_config
    from mmfm.typed_config import packaged_config

    if arm not in ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; expected some of {', '.join(ARMS)}")
    cfg = load_config(packaged_config("tokenizers/text_bpe_small.yaml" if arm == "spm"
                                      else "tokenizers/text_superbpe_small.yaml"))
    cfg.model.vocab_size = args.vocab_size
    if arm != "spm":
        cfg.model.transition_vocab_size = args.transition if arm == "superbpe" else args.vocab_size
    cfg.data.shards, cfg.data.modality = os.path.join(args.corpus, "text-*.tar"), "text"
    cfg.data.max_samples = 0
    cfg.train.out = os.path.join(args.out, arm, "tokenizer-train")
    return cfg


def prepare_arm(arm: str, args) -> str:
    """Stages 1-2; returns the arm's folder (tokens/, export-tokenizers/text)."""
    from mmfm.demos.e2e import tokenize_corpus
    from mmfm.tokenizers.commands import _train_text

    root = os.path.join(args.out, arm)
    cfg = tokenizer_config(arm, args)
    folder = os.path.join(cfg.train.out, "tokenizer")
    if not os.path.exists(os.path.join(folder, "tokenizer.yaml")):
        os.makedirs(cfg.train.out, exist_ok=True)
        if _train_text(cfg) != 0:
            raise RuntimeError(f"{arm}: training the text tokenizer failed")
    tok_root = os.path.join(root, "export-tokenizers")
    if not os.path.exists(os.path.join(tok_root, "text", "tokenizer.yaml")):
        shutil.copytree(folder, os.path.join(tok_root, "text"), dirs_exist_ok=True)
    rep = tokenize_corpus(args.corpus, {"text": folder}, os.path.join(root, "tokens"), max_text_tokens=HUGE)
    _say(f"[{arm}] tokens: {rep['train_samples']} train / {rep['eval_samples']} held-out documents, "
         f"{rep['modalities']['text']['tokens']} tokens, vocabulary {rep['vocab_size']}")
    return root


def pretrain_overrides(args, seed: int) -> list[str]:
    return ["data.pack=concat", "data.mix={}", "data.caption_dropout=0.0", "objective.loss_weights={}",
            f"data.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}", "train.grad_accum=1",
            f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}",
            f"train.checkpoint_every={args.steps}", "train.keep_last=1", f"train.seed={seed}",
            f"optim.warmup_steps={min(50, args.steps // 10)}", "train.progress=false", "train.plot=false",
            *args.override]


def train_one(arm: str, seed: int, args) -> None:
    """Stage 3 and 4 for one seed, in this process (called as a subprocess by main)."""
    import torch

    from mmfm.demos.e2e import pretrain_config
    from mmfm.eval.bits_per_byte import export_bits_per_byte, held_out_documents
    from mmfm.export import export
    from mmfm.jsonio import write_json
    from mmfm.train.loop import run

    torch.set_num_threads(args.threads)
    root = os.path.join(args.out, arm)
    result = os.path.join(root, f"bpb-s{seed}.json")
    if os.path.exists(result):
        return
    preset = {"pretrain_config": "pretrain/demo.yaml", "pretrain_overrides": pretrain_overrides(args, seed)}
    cfg = pretrain_config(root, preset, [f"train.out={os.path.join(root, f'pretrain-s{seed}')}"])
    t0 = time.perf_counter()
    res = run(cfg)
    seconds = time.perf_counter() - t0
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    out = export(res["out"], os.path.join(root, f"export-s{seed}"), os.path.join(root, "export-tokenizers"))
    bpb = export_bits_per_byte(out, held_out_documents(args.corpus), window=args.seq_len)
    with open(os.path.join(res["out"], "metrics.jsonl")) as f:
        evals = [{k: v for k, v in r.items() if k in ("step", "eval_loss")} for r in map(json.loads, f)
                 if "eval_loss" in r]
    write_json(result, {"arm": arm, "seed": seed, "export": out, "train_seconds": round(seconds, 1),
                        "steps": res["step"], "tokens_per_step": args.micro_batch * args.seq_len,
                        "eval_loss_per_token": evals, **bpb.to_dict()})
    _say(f"[{arm} seed {seed}] held-out bits/byte {bpb.bits_per_byte:.4f} ({bpb.tokens} tokens, {bpb.bytes} bytes, "
         f"{bpb.lossless_documents}/{bpb.documents} documents lossless); trained {seconds:.0f} s")


def summarize(args) -> dict:
    from mmfm.jsonio import write_json

    arms = {}
    for arm in args.arms:
        runs = []
        for seed in args.seeds:
            with open(os.path.join(args.out, arm, f"bpb-s{seed}.json")) as f:
                runs.append(json.load(f))
        v = [r["bits_per_byte"] for r in runs]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        arms[arm] = {"bits_per_byte": v, "mean": mean, "sd": sd, "min": min(v), "max": max(v),
                     "tokens_per_byte": runs[0]["tokens_per_byte"],
                     "bits_per_token": [r["bits_per_token"] for r in runs],
                     "lossless_documents": runs[0]["lossless_documents"], "documents": runs[0]["documents"],
                     "train_seconds": [r["train_seconds"] for r in runs],
                     "eval_loss_per_token": {r["seed"]: r["eval_loss_per_token"] for r in runs}}
    summary = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "arms": arms}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"| arm | V | t | held-out tokens/byte | bits/byte (seeds {','.join(map(str, args.seeds))}) | mean | sd "
          "| lossless docs |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for arm, a in arms.items():
        t = args.transition if arm == "superbpe" else args.vocab_size if arm == "bpe" else "-"
        print(f"| {arm} | {args.vocab_size} | {t} | {a['tokens_per_byte']:.4f} | "
              f"{', '.join(f'{x:.4f}' for x in a['bits_per_byte'])} | {a['mean']:.4f} | {a['sd']:.4f} | "
              f"{a['lossless_documents']}/{a['documents']} |")
    return summary


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a demo corpus folder (its text-*.tar documents)")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="bpe,superbpe", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--vocab-size", type=int, default=1000, help="text vocabulary of every arm (the demo's 1000)")
    p.add_argument("--transition", type=int, default=800, help="SuperBPE's transition vocabulary size")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a pretraining config override for every run (e.g. model.dim=256), after the tool's own; "
                        "repeatable")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)   # internal: one run
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    for a in args.arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}; expected some of {', '.join(ARMS)}")
    if not os.path.isdir(args.corpus) or not any(f.startswith("text-") for f in os.listdir(args.corpus)):
        p.error(f"--corpus {args.corpus!r}: not a folder with text-*.tar shards (a demo corpus)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    args.out, args.corpus = os.path.abspath(args.out), os.path.abspath(args.corpus)
    if args.one:
        train_one(args.one[0], int(args.one[1]), args)
        return 0
    for arm in args.arms:
        prepare_arm(arm, args)
    # ordered by seed, so a cut-short comparison still has every arm at the first seed; --jobs runs
    # that many at once (the arms of a seed side by side, under the same machine load)
    base = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
    todo = [(arm, seed) for seed in args.seeds for arm in args.arms
            if not os.path.exists(os.path.join(args.out, arm, f"bpb-s{seed}.json"))]
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            arm, seed = todo.pop(0)
            _say(f"[{arm} seed {seed}] pretraining: {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens")
            running.append(((arm, seed), subprocess.Popen([*base, "--one", arm, str(seed)])))
        (arm, seed), proc = running.pop(0)
        if proc.wait() != 0:
            raise RuntimeError(f"[{arm} seed {seed}] failed (status {proc.returncode})")
    summarize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
