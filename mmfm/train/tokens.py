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


def token_dataset(shards: str, *, seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                  shuffle_buffer: int = 64, loop: bool = True):
    """A ShardDataset over token shards, read identically on every rank (rank 0 of 1): each rank
    draws the same global batch and takes its own rows (mmfm/train/loop.py), so the data stream
    (and a run's losses) do not depend on the number of ranks. Costs every rank a read of the whole
    token stream, which is cheap next to a training step."""
    from mmfm.data.dataset import ShardDataset

    return ShardDataset(shards, seed=seed, shuffle_buffer=shuffle_buffer, loop=loop, rank=0, world_size=1,
                        fields=("npy",), tokenize=npy_tokens, seq_len=seq_len, pad_id=pad_id,
                        batch_size=batch_size, drop_last=True)


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
