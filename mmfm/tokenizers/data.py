"""Reading tokenizer training and eval data from shards with mmfm.data.

The demo-scale tokenizers train on a few hundred samples, so the split is read once into memory
(decoded by the ShardDataset pipeline, with its schema checks and bad-data accounting) and
mini-batches are drawn from it with a seeded generator: a resumed run draws the same batches.
A corpus too large for memory would stream through ShardLoader instead; the train loop only
sees an iterator of batches, so that swap does not touch it.

Held-out split: a sample is held out when the hash of its key falls in the first
`holdout_fraction` of the hash space: stable across runs, shard layouts and machines, and the
same split for `mmfm tokenizer train` and `mmfm tokenizer eval`.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from mmfm.data.dataset import ShardDataset, ShardLoader


def is_held_out(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def read_samples(shards: str, modality: str = "", split: str = "all", holdout_fraction: float = 0.1,
                 limit: int = 0) -> list[dict]:
    """Decoded samples of `shards` (of `modality`, if given) in the split 'train', 'eval' or 'all'."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"read_samples: argument 'split' must be train, eval or all, got {split!r}")
    if not shards:
        raise ValueError("read_samples: argument 'shards' is empty (set data.shards in the config)")
    ds = ShardDataset(shards, shuffle_shards=False, batch_size=64)
    out = []
    for batch in ShardLoader(ds):
        for s in batch["samples"]:
            if modality and s["json"].get("modality") != modality:
                continue
            held = is_held_out(s["__key__"], holdout_fraction)
            if split == "all" or (split == "eval") == held:
                out.append(s)
                if limit and len(out) >= limit:
                    return out
    return out


def prepare_all(tokenizer, samples: list[dict]) -> torch.Tensor:
    """Stack tokenizer.prepare(sample) over samples (all samples must prepare to one shape)."""
    if not samples:
        raise ValueError("prepare_all: no samples (check data.shards, data.modality and the held-out split)")
    return torch.stack([tokenizer.prepare(s) for s in samples])


def random_batches(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless mini-batches drawn with replacement; the generator's state is the iterator's state."""
    n = data.shape[0]
    while True:
        yield data[torch.randint(n, (min(batch_size, n),), generator=generator)]
