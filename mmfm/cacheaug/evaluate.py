"""`mmfm cacheaug eval`: perplexity of the tokens after an augmentation point, with and without
the coprocessor's latents, on held-out token shards.

Rows: every text segment (<begin_text> ... <end_text>) of every held-out sample gives up to
`points` augmentation points p, spaced `ahead` apart, with at least `min_prefix` tokens before p,
x_p in the segment's body and the `ahead` scored tokens x_{p+1} .. x_{p+ahead} inside the segment
(its <end_text> included). The cache holds the sample's ids before p (so a caption's prefix holds
its image, audio, video ... tokens), then the latents; x_p is fed and x_{p+1} .. are scored.
Category: `text` for text-only samples, `caption` for a text segment inside a sample of another
modality (captions and transcripts).

Scoring goes through the generation path (mmfm/cacheaug/generate.py: ragged prefill into a KVCache,
augment, teacher-forced decoding), so the figure is what `generate --coprocessor` decodes with.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile

import numpy as np
import torch

from mmfm.cacheaug.generate import cached_ahead_nll_many


def read_samples(spec: str, limit: int = 0):
    """(ids int64 1-D, meta dict) of each sample in token shards (folder, glob, brace pattern or list)."""
    from mmfm.data.shards import expand_shards

    n = 0
    for path in expand_shards(spec):
        with tarfile.open(path) as tar:
            pending: dict[str, dict] = {}
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                item = pending.setdefault(key, {})
                data = tar.extractfile(m).read()
                item[ext] = np.load(io.BytesIO(data), allow_pickle=False) if ext == "npy" else json.loads(data)
                if "npy" in item and "json" in item:
                    yield torch.from_numpy(pending.pop(key)["npy"].astype(np.int64)), item["json"]
                    n += 1
                    if limit and n >= limit:
                        return


def eval_rows(samples, vocab, *, ahead: int, points: int, min_prefix: int, max_prefix: int, max_rows: int = 0):
    """[(prefix ids, ahead ids, category)] as described in the module docstring."""
    if "text" not in vocab.ranges:
        raise ValueError("cacheaug eval: the vocabulary has no text modality")
    bt, et = vocab.begin_id("text"), vocab.end_id("text")
    rows = []
    for ids, meta in samples:
        cat = "text" if meta.get("modality", "text") == "text" else "caption"
        starts = (ids == bt).nonzero().flatten().tolist()
        ends = (ids == et).nonzero().flatten().tolist()
        for s in starts:
            e = next((x for x in ends if x > s), None)
            if e is None:
                continue
            p, taken = max(s + 1, min_prefix), 0
            while p + ahead <= e and taken < points:
                rows.append((ids[max(0, p - max_prefix):p], ids[p:p + ahead + 1], cat))
                p += ahead
                taken += 1
                if max_rows and len(rows) >= max_rows:
                    return rows
    return rows


def score(decoder, coprocessors: list, rows, batch: int = 32, pad_id: int = 0, table=None) -> list[torch.Tensor]:
    """[nll [R, ahead] for each entry of coprocessors (None = plain)], in batches of rows."""
    from tqdm import tqdm

    outs = [[] for _ in coprocessors]
    for i in tqdm(range(0, len(rows), batch), desc="cacheaug eval", unit="batch", file=sys.stderr):
        chunk = rows[i:i + batch]
        res = cached_ahead_nll_many(decoder, coprocessors, [r[0] for r in chunk], torch.stack([r[1] for r in chunk]),
                                    pad_id, table)
        for o, r in zip(outs, res):
            o.append(r)
    return [torch.cat(o) for o in outs]


def ppl_by_category(nll: torch.Tensor, cats: list[str]) -> dict[str, float]:
    res = {"all": math.exp(float(nll.mean()))}
    for c in sorted(set(cats)):
        sel = torch.tensor([x == c for x in cats])
        res[c] = math.exp(float(nll[sel].mean()))
    return res


def evaluate(decoder_dir: str, coprocessor_dirs: list[str], shards: str, *, ahead: int = 8, points: int = 4,
             min_prefix: int = 8, max_rows: int = 0, batch: int = 32, vocab_path: str | None = None) -> list[dict]:
    """Records (bench cacheaug, figure ppl, case latents / data / ahead / rows; impl `decoder` for the
    plain cache and `mmfm` for the augmented one), N = 0 first (the plain decoder through augment's
    no-op path), then one pair per coprocessor."""
    from mmfm.cacheaug.coprocessor import load_coprocessor, load_decoder, weights_hash
    from mmfm.vocab import Vocab

    decoder = load_decoder(decoder_dir)
    vocab = Vocab.load(vocab_path or os.path.join(decoder_dir, "vocab.json"))
    table = vocab.modality_table() if decoder.cfg.groups > 1 else None
    coprocs = [load_coprocessor(d, decoder) for d in coprocessor_dirs]
    dec_hash = weights_hash(decoder)
    for d, c in zip(coprocessor_dirs, coprocs):
        want = c.meta.get("decoder_sha256")
        if want and want != dec_hash:
            raise ValueError(f"cacheaug eval: {d} was trained against a decoder with sha256 {want[:12]}, "
                             f"but {decoder_dir} has {dec_hash[:12]}")
    n_max = max([c.num_latents for c in coprocs] + [0])
    rows = eval_rows(read_samples(shards), vocab, ahead=ahead, points=points, min_prefix=min_prefix,
                     max_prefix=decoder.cfg.max_seq_len - n_max - ahead - 1, max_rows=max_rows)
    if not rows:
        raise ValueError(f"cacheaug eval: no text segment in {shards} is long enough for min_prefix {min_prefix} "
                         f"and ahead {ahead}")
    cats = [r[2] for r in rows]
    counts = {c: cats.count(c) for c in set(cats)}
    counts["all"] = len(cats)
    from mmfm.cacheaug.coprocessor import Coprocessor

    order = sorted(zip(coprocessor_dirs, coprocs), key=lambda x: x[1].num_latents)
    # N = 0 goes through augment like the others (a coprocessor with no latents adds nothing)
    entries = [None, Coprocessor(decoder.cfg, 0)] + [c for _, c in order]
    nlls = score(decoder, entries, rows, batch, vocab.pad_id, table)
    plain = ppl_by_category(nlls[0], cats)
    records = []
    for c, nll in zip(entries[1:], nlls[1:]):
        aug = ppl_by_category(nll, cats)
        for k in plain:
            case = {"latents": c.num_latents, "data": k, "ahead": ahead, "rows": counts[k]}
            records.append({"bench": "cacheaug", "case": case, "impl": "decoder", "ppl": plain[k]})
            records.append({"bench": "cacheaug", "case": case, "impl": "mmfm", "ppl": aug[k]})
    if weights_hash(decoder) != dec_hash:
        raise RuntimeError("cacheaug eval: the decoder's weights changed during evaluation")
    return records


def print_records(records: list[dict], out=None) -> None:
    out = out or sys.stdout
    print(f"{'latents':>7}  {'data':<8} {'rows':>5}  {'plain ppl':>9}  {'augmented ppl':>13}  {'ratio':>6}", file=out)
    by = {}
    for r in records:
        by.setdefault(json.dumps(r["case"], sort_keys=True), {})[r["impl"]] = r
    for v in by.values():
        c = v["decoder"]["case"]
        p, a = v["decoder"]["ppl"], v["mmfm"]["ppl"]
        print(f"{c['latents']:>7}  {c['data']:<8} {c['rows']:>5}  {p:>9.3f}  {a:>13.3f}  {a / p:>6.3f}", file=out)
