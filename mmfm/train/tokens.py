"""Token shards: the training data path.

Chosen path: PRE-TOKENIZE. Each raw sample (a shard sample of any modality, with its caption or
transcript) is tokenized once by the trained tokenizers and laid into the unified vocabulary
(`Vocab.encode_sample`), and the ids are written as webdataset shards of their own:

    <key>.npy    int32 ids of one encoded sample: <bos> <begin_M> ... <end_M> [<begin_text> ...] <eos>
    <key>.json   the raw sample's own metadata (modality, source, license, ...) plus "token_source"

Training reads them with mmfm.data's ShardDataset (tokenize hook = "take the .npy"), which
packs samples into seq_len sequences and keeps the exact-resume state. Why not tokenize on the fly:
the neural tokenizers would run again every epoch on every rank, in the loop's critical path, on
2 cores; a token shard is read in microseconds, and the same shards serve every run and rank.
Modality ids are not stored: they follow from the ids (Vocab.modality_table()).
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np


def write_token_shards(samples, out_dir: str, prefix: str = "tokens", shard_size: int = 1000) -> list[str]:
    """samples: iterable of (key, ids (1-D ints), meta dict with modality/source/license). Atomic per shard."""
    os.makedirs(out_dir, exist_ok=True)
    paths, tar, count, index = [], None, 0, 0

    def close():
        nonlocal tar
        if tar is not None:
            tar.close()
            final = os.path.join(out_dir, f"{prefix}-{index:06d}.tar")
            os.replace(final + ".tmp", final)
            paths.append(final)
            tar = None

    def add(name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    for key, ids, meta in samples:
        if tar is None:
            tar = tarfile.open(os.path.join(out_dir, f"{prefix}-{index:06d}.tar.tmp"), "w", format=tarfile.USTAR_FORMAT)
        buf = io.BytesIO()
        np.save(buf, np.asarray(ids, dtype=np.int32).reshape(-1), allow_pickle=False)
        add(f"{key}.npy", buf.getvalue())
        add(f"{key}.json", json.dumps(meta).encode())
        count += 1
        if count % shard_size == 0:
            close()
            index += 1
    close()
    return paths


def npy_tokens(sample: dict):
    """The ShardDataset tokenize hook for token shards."""
    return sample["npy"]


def modality_counts(shards) -> dict[str, int]:
    """{modality: samples} over token shards, from each sample's .json (one read of the shards)."""
    import json

    from mmfm.data.shards import expand_shards
    from mmfm.data.tario import iter_shard

    counts: dict[str, int] = {}
    for url in expand_shards(shards):
        for _, fields in iter_shard(url, lambda *a, **k: None):
            try:
                m = json.loads(fields["json"]).get("modality")
            except (KeyError, ValueError):
                continue
            counts[m] = counts.get(m, 0) + 1
    return counts


def caption_dropout(vocab, p: float, seed: int):
    """A tokenize hook: with probability p, a sample <bos> <begin_text> caption <end_text> <begin_M> ...
    (M not text) loses its caption and becomes <bos> <begin_M> ..., the unconditional prompt of
    classifier-free guidance (mmfm.generate.prompt.unconditional_prompt). Without such samples the
    model never sees that prompt and guidance extrapolates from an untrained branch. The draw is a
    hash of (seed, the sample's place in the stream), not a generator's next number, so a resumed
    run (which skips samples without decoding them) drops the same captions as an uninterrupted one.
    Text documents and samples whose text follows the modality (transcripts after audio) are kept."""
    import numpy as np

    from mmfm.data.pipeline import PURPOSE_SAMPLE

    if not 0.0 <= p < 1.0:
        raise ValueError(f"caption_dropout: p must be in [0, 1), got {p}")
    bos, begin_text, end_text = vocab.bos_id, vocab.begin_id("text"), vocab.end_id("text")
    begins = {vocab.begin_id(m) for m in vocab.ranges if m != "text"}

    def hook(sample: dict):
        ids = sample["npy"]
        if p == 0.0 or len(ids) < 4 or ids[0] != bos or ids[1] != begin_text:
            return ids
        ends = np.flatnonzero(ids == end_text)
        if not len(ends) or ends[0] + 1 >= len(ids) or int(ids[ends[0] + 1]) not in begins:
            return ids
        epoch, draw = sample.get("__draw__", (0, 0))
        if np.random.default_rng([seed, PURPOSE_SAMPLE, epoch, draw]).random() >= p:
            return ids
        return np.concatenate([ids[:1], ids[ends[0] + 1:]])
    return hook


def mixture_sources(shard_sets: dict, source_weights: dict | None = None, mix: dict | None = None,
                    have: dict | None = None) -> list:
    """The mmfm.data Sources of a mixture over named shard sets (mmfm.train.config.DataSection):

      - no mix: one source per set, weight w_s (source_weights, default 1), all its samples;
      - mix: for each modality m and each set s holding m (have[s][m] > 0), a source of s's samples
        of modality m with weight  mix_m / sum(mix) * w_s / sum of w over the sets holding m,
        so the modality shares are mix's and the sets split each modality by their weights.

    Source names are "<set>" or "<set>/<modality>". have: {set: {modality: samples}}
    (modality_counts); a mix modality no set holds is a ValueError naming it."""
    from mmfm.data.dataset import Source

    w = {s: float((source_weights or {}).get(s, 1.0)) for s in shard_sets}
    if not mix:
        return [Source(shards, w[s], name=s) for s, shards in shard_sets.items()]
    total = sum(mix.values())
    out = []
    for m, share in mix.items():
        holders = [s for s in shard_sets if (have or {}).get(s, {}).get(m)]
        if not holders:
            raise ValueError(f"mix.{m}: no samples of modality {m!r} in any shard set ({', '.join(shard_sets)})")
        norm = sum(w[s] for s in holders)
        out += [Source(shard_sets[s], share / total * w[s] / norm, name=f"{s}/{m}", modality=m) for s in holders]
    return out


def token_dataset(shards, *, seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                  shuffle_buffer: int = 64, loop: bool = True, pack: str = "concat", mix: dict | None = None,
                  tokenize=npy_tokens, source_weights: dict | None = None, resampled: bool = False):
    """A ShardDataset over token shards, read identically on every rank (rank 0 of 1): each rank
    draws the same global batch and takes its own rows (mmfm/train/loop.py), so the data stream
    (and a run's losses) do not depend on the number of ranks. Costs every rank a read of the whole
    token stream, which is cheap next to a training step.

    pack: "concat" or "whole" (mmfm.data.pipeline.pack_sequences). mix: {modality: weight}: each
    sample is drawn from modality m with probability weight_m / sum(weights) (its .json's
    "modality"), each modality reshuffled and repeated independently, forever (resampled shards);
    modalities not named are not drawn. Exact resume as for any ShardDataset (the position counts
    draws of the mixed stream). Every modality reads the shards it shares with others and keeps its
    own samples: free for the demo's few MB; write one modality per shard for large corpora.

    shards may also be {name: shards} (several shard sets; source_weights by name):
    mixture_sources says how they and mix combine. A mixture, and resampled=True, stream epoch-free:
    every source draws its shards with replacement, forever (no epoch boundary at which a small source
    runs dry and the weights drift); exact resume as above."""
    from mmfm.data.dataset import ShardDataset, Source

    common = dict(seed=seed, shuffle_buffer=shuffle_buffer, rank=0, world_size=1, fields=("npy",),
                  tokenize=tokenize, seq_len=seq_len, pad_id=pad_id, batch_size=batch_size, drop_last=True,
                  pack=pack)
    sets = shards if isinstance(shards, dict) else None
    if mix or sets or resampled:
        if not loop:
            raise ValueError("token_dataset: a mix, several sources or resampled shards draw forever; it needs loop=True")
        if sets:
            have = {s: modality_counts(sh) for s, sh in sets.items()} if mix else None
            sources = mixture_sources(sets, source_weights, mix, have)
        elif mix:
            sources = [Source(shards, float(w), name=m, modality=m) for m, w in mix.items()]
        else:
            sources = [Source(shards)]
        return ShardDataset(sources, resampled=True, loop=True, **common)
    return ShardDataset(shards, loop=loop, **common)


def train_token_dataset(data, vocab, *, batch_size: int, seed: int):
    """The training stream of a pretrain config's data section (mmfm.train.config.DataSection):
    packing, per-modality mix and caption dropout. A mix naming a modality the shards lack stops
    here, naming it (a source with no samples would otherwise be read forever)."""
    from mmfm.typed_config import ConfigError

    shards = data.sources or data.shards
    if data.mix:
        have: dict[str, int] = {}
        for sh in (data.sources.values() if data.sources else [data.shards]):
            for k, v in modality_counts(sh).items():
                have[k] = have.get(k, 0) + v
        for m in data.mix:
            if not have.get(m):
                where = f"data.sources {data.sources}" if data.sources else f"data.shards {data.shards}"
                raise ConfigError(f"data.mix.{m}: no samples of modality {m!r} in {where} "
                                  f"(it has {', '.join(f'{k} {v}' for k, v in sorted(have.items())) or 'none'})")
    hook = caption_dropout(vocab, data.caption_dropout, seed) if data.caption_dropout else npy_tokens
    return token_dataset(shards, seq_len=data.seq_len, batch_size=batch_size, pad_id=vocab.pad_id, seed=seed,
                         shuffle_buffer=data.shuffle_buffer, pack=data.pack, mix=data.mix or None, tokenize=hook,
                         source_weights=data.source_weights or None, resampled=data.resampled)


def source_names(dataset) -> list[str]:
    """The shard-set name of each source of a token dataset, by source index (the batches'
    source_ids): "web/image" -> "web"; a single unnamed source -> []."""
    names = [s.name.split("/")[0] for s in getattr(dataset, "sources", [])]
    return names if len(names) > 1 else []


def synthetic_token_corpus(out_dir: str, vocab, n: int = 200, seed: int = 0, prefix: str = "tokens") -> list[str]:
    """For tests: samples of 1-3 segments with learnable structure (runs of counting ids per modality)."""
    rng = np.random.default_rng(seed)
    names = list(vocab.ranges)

    def gen():
        for i in range(n):
            segs = []
            for _ in range(int(rng.integers(1, 4))):
                m = names[int(rng.integers(len(names)))]
                size = vocab.ranges[m].size
                start, length, step = int(rng.integers(size)), int(rng.integers(4, 24)), int(rng.integers(1, 3))
                segs.append((m, (start + step * np.arange(length)) % size))
            ids, _ = vocab.encode_sample(segs)
            yield f"s{i:06d}", ids.numpy(), {"modality": "text", "source": "synthetic", "license": "Apache-2.0"}
    return write_token_shards(gen(), out_dir, prefix, shard_size=max(1, n // 4))
