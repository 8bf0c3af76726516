"""`mmfm tokenize --tokenizers DIR --src SHARDS --out DIR`: raw shards -> token shards, at scale.

The demo's token-shard stage as a command. Each sample becomes
<bos> [<begin_text> caption <end_text>] <begin_M> tokens <end_M> <eos> in the unified vocabulary
(a text document is one text segment), written by mmfm.train.tokens.write_token_shards.

Work unit: one input shard. Worker processes (N, or one per GPU when CUDA is there) each load
the tokenizers once and take shards from a queue; inside a shard, samples of a modality go
through the tokenizer `--batch-size` at a time. A shard's outputs are `train-<id>-000000.tar`
and `eval-<id>-000000.tar` (held-out by the key hash, as tokenizer training splits), written to
`.tmp` names and renamed; then `.done/<id>.json` records its counts. The marker is the commit
point: a rerun after a kill skips every shard with a marker and redoes the others, whose
outputs (if any were renamed) are overwritten under the same names, so no sample is duplicated
or lost. `vocab.json` is written first and must match on resume (other tokenizers, other ids).
`tokens-report.json` sums the markers: samples, skipped samples and tokens per modality,
samples/s. A tokenizer DIR holds one folder per modality: DIR/<modality>/tokenizer.yaml or
DIR/<modality>/tokenizer/tokenizer.yaml (what `mmfm tokenizer train` and the demo write); text
is required (captions), the others are optional (their samples are skipped and counted).

Test hook: MMFM_FAULT_TOKENIZE_KILL="<n>:<stage>" SIGKILLs the process (with --workers 1, which
runs in-process) at shard n, stage `written` (outputs renamed, no marker yet) or `done` (after
the marker): a real kill at the two points that matter for resume.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from mmfm.data.schema import MODALITIES
from mmfm.jsonio import write_json

DONE_DIR = ".done"


@dataclass
class TokenizeJob:
    tokenizers: dict          # modality -> saved tokenizer folder
    out: str
    batch_size: int = 32
    holdout_fraction: float = 0.1
    max_text_tokens: int = 512


def find_tokenizers(root: str) -> dict:
    from mmfm.tokenizers.base import tokenizer_folders

    found = tokenizer_folders(root, MODALITIES)
    if "text" not in found:
        raise ValueError(f"--tokenizers {root!r}: no text tokenizer (expected {root}/text/tokenizer.yaml or "
                         f"{root}/text/tokenizer/tokenizer.yaml); found: {', '.join(found) or 'none'}")
    return found


def shard_id(url: str) -> str:
    """A file-name-safe id per input shard: its name plus a hash of the full URL (two folders may
    both hold a 000000.tar)."""
    base = os.path.basename(url.rstrip("/").split(" ")[-1]) or "shard"
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in base.rsplit(".tar", 1)[0])[:60]
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def build_vocab(toks: dict):
    from mmfm.vocab import Vocab

    return Vocab(toks["text"].vocab_size, {m: toks[m].vocab_size for m in MODALITIES if m != "text" and m in toks})


# -- one shard, in whatever process runs it ---------------------------------------------------
_STATE: dict = {}


def _load(job: TokenizeJob, device: str = "cpu") -> None:
    import torch

    from mmfm.tokenizers.base import load_tokenizer

    torch.set_num_threads(1)  # parallelism is the worker processes; threads inside them would oversubscribe
    toks = {m: load_tokenizer(p, device=device) for m, p in job.tokenizers.items()}
    _STATE.update(job=job, toks=toks, vocab=build_vocab(toks), device=device)


def _worker_init(job: TokenizeJob, devices) -> None:
    device = "cpu"
    if devices is not None:
        device = devices.get()
    _load(job, device)


def _fault(n: int, stage: str) -> None:
    spec = os.environ.get("MMFM_FAULT_TOKENIZE_KILL", "")
    if spec and spec == f"{n}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def token_rows(samples: list[dict], modality: str, tok, text, vocab, *, batch_size: int, max_text_tokens: int,
               source: str, skip) -> list:
    """(key, ids, meta) of the samples of one modality, in their order: each becomes
    <bos> [<begin_text> caption <end_text>] <begin_M> tokens <end_M> <eos> (a text document: one text
    segment cut at max_text_tokens). A sample the tokenizer cannot take is passed to skip(why) and
    left out. `mmfm tokenize` and the demo's token stage both build their rows here."""
    import torch

    from mmfm.tokenizers.commands import _usable

    good = samples
    if modality != "text":
        good = []
        for s in samples:
            try:
                if _usable(tok, s):
                    tok.prepare(s)
                    good.append(s)
                    continue
                why = "shape the tokenizer does not take"
            except ValueError as e:
                why = type(e).__name__
            skip(why)
    rows = []
    for i in range(0, len(good), batch_size):
        chunk = good[i:i + batch_size]
        # a list of rows: an adaptive-length image tokenizer (target_psnr) gives rows of their own lengths
        codes = None if modality == "text" else [c.cpu() for c in tok.encode_batch(chunk)]
        for j, s in enumerate(chunk):
            segs = []
            caption = s.get("txt") if isinstance(s.get("txt"), str) else ""
            if caption:
                segs.append(("text", text.encode(caption)[:max_text_tokens]))
            if codes is not None:
                segs.append((modality, codes[j]))
            if not segs:
                skip("no caption and no payload")
                continue
            ids, _ = vocab.encode_sample(segs)
            rows.append((s["__key__"], ids.numpy() if isinstance(ids, torch.Tensor) else ids,
                         {**s["json"], "token_source": source}))
    return rows


def _rows(samples: list[dict], modality: str, report: dict) -> list:
    """token_rows for one modality of a shard, counted into the shard's report."""
    job, toks, vocab = _STATE["job"], _STATE["toks"], _STATE["vocab"]
    tok = toks.get(modality)
    entry = report["modalities"].setdefault(modality, {"samples": 0, "skipped": 0, "tokens": 0})
    if tok is None:
        entry["skipped"] += len(samples)
        report["reasons"][f"no {modality} tokenizer"] = report["reasons"].get(f"no {modality} tokenizer", 0) + len(samples)
        return []

    def skip(why: str) -> None:
        entry["skipped"] += 1
        report["reasons"][f"{modality}: {why}"] = report["reasons"].get(f"{modality}: {why}", 0) + 1

    rows = token_rows(samples, modality, tok, toks["text"], vocab, batch_size=job.batch_size,
                      max_text_tokens=job.max_text_tokens, source="mmfm tokenize", skip=skip)
    entry["samples"] += len(rows)
    entry["tokens"] += sum(int(len(ids)) for _, ids, _ in rows)
    return rows


def tokenize_shard(task: tuple) -> dict:
    """Tokenize one input shard into its train/eval token shards; returns its report (also the marker)."""
    from mmfm.data import pipeline as P
    from mmfm.data.baddata import BadDataLog, BadDataPolicy
    from mmfm.tokenizers.data import is_held_out
    from mmfm.train.tokens import write_token_shards

    n, url, sid = task
    job = _STATE["job"]
    t0 = time.perf_counter()
    bad = BadDataLog(BadDataPolicy(max_bad_fraction=1.0, max_failed_shard_fraction=1.0))  # count, never stop
    by_modality: dict[str, list] = {}
    for s in P.decode_samples(P.read_samples([url], bad), bad):
        by_modality.setdefault(s["json"]["modality"], []).append(s)
    report = {"shard": url, "id": sid, "modalities": {}, "reasons": {}, "files": [], "device": _STATE["device"]}
    rows = []
    for m in MODALITIES:
        if m in by_modality:
            rows += _rows(by_modality.pop(m), m, report)
    splits = {"train": [], "eval": []}
    for key, ids, meta in rows:
        splits["eval" if is_held_out(key, job.holdout_fraction) else "train"].append((key, ids, meta))
    for split, items in splits.items():
        if items:
            paths = write_token_shards(items, job.out, prefix=f"{split}-{sid}", shard_size=len(items))
            report["files"] += [os.path.basename(p) for p in paths]
            report[f"{split}_samples"] = len(items)
    report["bad_samples"], report["bad_kinds"] = bad.bad_samples, dict(bad.counts)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    _fault(n, "written")
    write_json(os.path.join(job.out, DONE_DIR, f"{sid}.json"), report)
    _fault(n, "done")
    return report


# -- the run ----------------------------------------------------------------------------------
def _check_vocab(out: str, toks: dict) -> int:
    vocab = build_vocab(toks)
    path = os.path.join(out, "vocab.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != vocab.to_dict():
            raise ValueError(f"{path} was written for other tokenizers (its ranges differ); a resumed run must use "
                             f"the same --tokenizers, or a new --out")
    else:
        vocab.save(path)
    return vocab.size


def run_tokenize(tokenizers: str, src, out: str, workers: int = 0, batch_size: int = 32,
                 holdout_fraction: float = 0.1, progress: bool = True) -> dict:
    import multiprocessing as mp

    import torch
    from tqdm import tqdm

    from mmfm.data.shards import expand_shards

    t0 = time.perf_counter()  # loading the tokenizers counts: a run pays it, in-process or in each worker
    job = TokenizeJob(find_tokenizers(tokenizers), out, batch_size, holdout_fraction)
    urls = expand_shards(src)
    ids = [shard_id(u) for u in urls]
    if len(set(ids)) != len(ids):
        raise ValueError("--src names the same shard twice")
    os.makedirs(os.path.join(out, DONE_DIR), exist_ok=True)
    for stale in glob.glob(os.path.join(out, "*.tmp")):  # a killed run's half-written shard: redone below
        os.remove(stale)
    _load(job, "cuda:0" if torch.cuda.is_available() else "cpu")  # this process: the vocabulary, and the work when in-process
    vocab_size = _check_vocab(out, _STATE["toks"])
    done = {i for i in ids if os.path.exists(os.path.join(out, DONE_DIR, f"{i}.json"))}
    todo = [(n, u, i) for n, (u, i) in enumerate(zip(urls, ids), 1) if i not in done]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = workers or gpus or 1
    samples = 0
    bar = tqdm(total=len(urls), initial=len(done), desc="tokenize", unit="shard", file=sys.stderr, disable=not progress)

    def account(r):
        nonlocal samples
        samples += sum(e["samples"] for e in r["modalities"].values())
        bar.update(1)
        bar.set_postfix_str(f"{samples / max(time.perf_counter() - t0, 1e-9):.1f} samples/s")

    if workers == 1 or len(todo) <= 1:
        for task in todo:
            account(tokenize_shard(task))
    else:
        ctx = mp.get_context("spawn")  # CUDA and OpenMP state do not survive a fork
        devices = None
        if gpus:
            devices = ctx.Manager().Queue()
            for w in range(workers):
                devices.put(f"cuda:{w % gpus}")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(job, devices)) as pool:
            for r in pool.imap_unordered(tokenize_shard, todo):
                account(r)
    bar.close()
    elapsed = time.perf_counter() - t0
    return write_report(out, urls, ids, vocab_size, workers, samples, elapsed, resumed=len(done))


def write_report(out, urls, ids, vocab_size, workers, new_samples, elapsed, resumed) -> dict:
    per = {m: {"samples": 0, "skipped": 0, "tokens": 0} for m in MODALITIES}
    reasons: dict = {}
    train = evals = bad = 0
    for i in ids:
        with open(os.path.join(out, DONE_DIR, f"{i}.json")) as f:
            r = json.load(f)
        for m, e in r["modalities"].items():
            for k in per[m]:
                per[m][k] += e[k]
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
        train += r.get("train_samples", 0)
        evals += r.get("eval_samples", 0)
        bad += r.get("bad_samples", 0)
    report = {"modalities": per, "skip_reasons": reasons, "undecodable_samples": bad, "vocab_size": vocab_size,
              "train_samples": train, "eval_samples": evals, "shards": len(urls), "resumed_shards": resumed,
              "workers": workers, "seconds": round(elapsed, 2),
              "samples_per_s": round(new_samples / elapsed, 2) if elapsed > 0 else 0.0}
    write_json(os.path.join(out, "tokens-report.json"), report)
    return report


def add_tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="raw shards -> token shards through trained tokenizers (workers, resumable)")
    p.add_argument("--tokenizers", required=True, help="folder with one saved tokenizer per modality (text required)")
    p.add_argument("--src", required=True, help="raw shards: a folder, brace pattern, glob or pipe: URL")
    p.add_argument("--out", required=True, help="folder for the token shards, vocab.json and tokens-report.json")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per GPU, else 1)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per tokenizer call (default 32)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="eval split by key hash (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_tokenize(args) -> int:
    try:
        r = run_tokenize(args.tokenizers, args.src, args.out, args.workers, args.batch_size, args.holdout_fraction,
                         progress=not args.quiet)
    except ValueError as e:
        print(f"mmfm tokenize: {e}", file=sys.stderr)
        return 2
    print(f"{'modality':<10} {'samples':>8} {'skipped':>8} {'tokens':>10}")
    for m, e in r["modalities"].items():
        if e["samples"] or e["skipped"]:
            print(f"{m:<10} {e['samples']:>8} {e['skipped']:>8} {e['tokens']:>10}")
    print(f"{r['train_samples']} train + {r['eval_samples']} eval samples from {r['shards']} shards "
          f"({r['resumed_shards']} already done), {r['samples_per_s']} samples/s with {r['workers']} worker(s) "
          f"-> {os.path.join(args.out, 'tokens-report.json')}")
    return 0
