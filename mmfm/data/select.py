"""`mmfm data select`: data selection by importance resampling (DSIR, Xie et al. 2023).

Given target shards (what we want more of) and raw shards (the pool), pick k raw samples:
  1. features: the sample's text (the document, or the caption / transcript / description of
     another modality) lower-cased, split into words; unigrams and bigrams hashed (crc32) into
     `buckets` bins;
  2. two bag-of-hashed-n-grams models, p_target and p_raw, from the bin counts of each set
     (add-`alpha` smoothing);
  3. importance weight of a raw sample x: log w(x) = sum over its n-grams of
     log p_target(f) - log p_raw(f);
  4. Gumbel-top-k: add independent Gumbel(0, 1) noise to log w and keep the k largest, which
     samples k items without replacement with probabilities proportional to w.
The selected samples are copied byte for byte into new shards, with `select-report.json`.
Samples without text cannot be scored; they are counted and never selected.
"""
from __future__ import annotations

import json
import re
import sys
import zlib

import numpy as np

from mmfm.data.shards import expand_shards
from mmfm.data.tario import iter_shard
from mmfm.jsonio import write_json

WORD = re.compile(r"[a-z0-9]+")


def ngram_buckets(text: str, buckets: int) -> np.ndarray:
    words = WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return np.fromiter((zlib.crc32(g.encode()) % buckets for g in grams), dtype=np.int64, count=len(grams))


def _texts(spec, problems):
    """(shard, key, text or None) for every sample of the shards."""
    report = lambda kind, shard, key, detail: problems.append((kind, shard, key, detail))  # noqa: E731
    for url in expand_shards(spec):
        for key, fields in iter_shard(url, report):
            text = fields.get("txt")
            yield url, key, (text.decode("utf-8", errors="replace") if text is not None else None)


def fit_ngram_model(feature_lists, buckets: int, alpha: float = 1.0) -> np.ndarray:
    counts = np.zeros(buckets, dtype=np.float64)
    for f in feature_lists:
        np.add.at(counts, f, 1.0)
    return np.log((counts + alpha) / (counts.sum() + alpha * buckets))


def gumbel_top_k(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    keys = log_weights + rng.gumbel(size=log_weights.shape)
    keys[~np.isfinite(log_weights)] = -np.inf
    k = min(k, int(np.isfinite(log_weights).sum()))
    return np.argsort(-keys, kind="stable")[:k]


def dsir_select(target, raw, k: int, buckets: int = 10_000, alpha: float = 1.0, seed: int = 0) -> dict:
    """Score every raw sample and choose k; returns the selection and the numbers for the report."""
    problems: list = []
    target_feats = [ngram_buckets(t, buckets) for _, _, t in _texts(target, problems) if t]
    if not target_feats:
        raise ValueError(f"--target {target!r}: no sample with a .txt field to learn the target from")
    raw_items = list(_texts(raw, problems))
    raw_feats = [ngram_buckets(t, buckets) if t else None for _, _, t in raw_items]
    log_p_target = fit_ngram_model(target_feats, buckets, alpha)
    log_p_raw = fit_ngram_model([f for f in raw_feats if f is not None], buckets, alpha)
    diff = log_p_target - log_p_raw
    log_w = np.array([diff[f].sum() if f is not None else -np.inf for f in raw_feats])
    chosen = gumbel_top_k(log_w, k, np.random.default_rng(seed))
    return {"items": raw_items, "log_weights": log_w, "chosen": chosen, "target_samples": len(target_feats),
            "problems": problems}


def write_selection(result: dict, out: str, shard_size: int = 1000) -> dict:
    """Copy the chosen raw samples, bytes unchanged, into `out/selected-*.tar`."""
    from mmfm.data.writer import SampleShardWriter

    by_shard: dict[str, set] = {}
    for i in result["chosen"]:
        shard, key, _ = result["items"][i]
        by_shard.setdefault(shard, set()).add(key)
    written, renamed = 0, 0
    with SampleShardWriter(out, prefix="selected", shard_size=shard_size) as w:
        for shard, keys in sorted(by_shard.items()):
            for key, fields in iter_shard(shard, lambda *a: None):
                if key not in keys:
                    continue
                sample = {"__key__": key, **fields, "json": json.loads(fields["json"])}
                while sample["__key__"] in w._keys:  # the same key in two raw shards
                    sample["__key__"] += "_dup"
                    renamed += 1
                w.write(sample)
                written += 1
    return {"written": written, "renamed_duplicate_keys": renamed, "shards": [s["name"] for s in w.manifest["shards"]]}


def main(args) -> int:
    try:
        result = dsir_select(args.target, args.raw, args.k, args.buckets, seed=args.seed)
    except ValueError as e:
        print(f"mmfm data select: {e}", file=sys.stderr)
        return 2
    written = write_selection(result, args.out)
    lw, chosen = result["log_weights"], result["chosen"]
    scored = np.isfinite(lw)
    report = {"k": args.k, "selected": int(len(chosen)), "raw_samples": len(lw), "raw_without_text": int((~scored).sum()),
              "target_samples": result["target_samples"], "buckets": args.buckets, "seed": args.seed,
              "mean_log_weight_raw": float(lw[scored].mean()) if scored.any() else None,
              "mean_log_weight_selected": float(lw[chosen].mean()) if len(chosen) else None,
              "read_problems": [list(p) for p in result["problems"][:100]], **written,
              "samples": [{"shard": result["items"][i][0], "key": result["items"][i][1], "log_weight": float(lw[i])}
                          for i in chosen]}
    write_json(f"{args.out}/select-report.json", report)
    print(f"selected {report['selected']} of {report['raw_samples']} raw samples "
          f"({report['raw_without_text']} without text, not scorable) toward {report['target_samples']} target samples")
    print(f"mean log importance weight: raw {report['mean_log_weight_raw']:.2f}, "
          f"selected {report['mean_log_weight_selected']:.2f}")
    print(f"wrote {written['written']} samples in {len(written['shards'])} shards and select-report.json to {args.out}")
    return 0
