"""The reader pipeline: a chain of named stages, each a small generator function.

    shard list  ->  split by node  ->  split by worker  ->  read samples  ->  shuffle buffer
      -> (mix sources by weight)  ->  count + fast-forward  ->  decode  ->  tokenize  ->  pack  ->  batch

Everything random draws from a numpy Generator seeded by (seed, epoch, worker, purpose), so a
worker's stream is a pure function of those numbers and the shard contents. That is what makes
resume exact: `WorkerPosition` records the epoch, how many samples the worker has pulled
out of its shuffled stream, and what the packer holds; a resumed worker rebuilds the same
stream, skips that many samples without decoding them, and restores the packer.
ShardDataset (dataset.py) wires the stages; the stages know nothing of workers or torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from mmfm.data.baddata import BadDataLog
from mmfm.data.codecs import DecodeError, check_sample, decode_field
from mmfm.data.schema import SchemaError, check_meta
from mmfm.data.tario import iter_shard

PURPOSE_SHARDS, PURPOSE_SHUFFLE, PURPOSE_MIX, PURPOSE_RESAMPLE, PURPOSE_SAMPLE = 1, 2, 3, 4, 5


def make_rng(seed: int, epoch: int, worker: int, purpose: int, source: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, worker, purpose, source])


@dataclass
class WorkerPosition:
    """Where one worker is: enough to rebuild its stream exactly."""
    epoch: int = 0
    consumed: int = 0  # samples pulled from the shuffled (and mixed) stream in this epoch
    leftover: list = field(default_factory=list)  # packer carry: [[key, [tokens...], source index], ...]

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed,
                "leftover": [[e[0], list(map(int, e[1])), *e[2:]] for e in self.leftover]}

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerPosition":
        # states saved before the source index was carried have [key, tokens]: source 0
        return cls(int(d["epoch"]), int(d["consumed"]),
                   [[e[0], list(e[1]), int(e[2]) if len(e) > 2 else 0] for e in d.get("leftover", [])])


# -- shard list ---------------------------------------------------------------------------
def epoch_shard_order(urls: list[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The epoch's shard order, the same on every rank and worker (they split it afterwards)."""
    if not shuffle:
        return list(urls)
    order = make_rng(seed, epoch, 0, PURPOSE_SHARDS).permutation(len(urls))
    return [urls[i] for i in order]


def split_by_node(urls: list[str], rank: int, world_size: int) -> list[str]:
    return urls[rank::world_size]


def split_by_worker(urls: list[str], worker: int, num_workers: int) -> list[str]:
    return urls[worker::num_workers]


def resampled_shards(urls: list[str], rng: np.random.Generator) -> Iterator[str]:
    """Shards drawn with replacement, forever: for mixtures and for more workers than shards."""
    while True:
        yield urls[int(rng.integers(len(urls)))]


# -- samples ------------------------------------------------------------------------------
def read_samples(shard_urls: Iterable[str], bad: BadDataLog) -> Iterator[dict]:
    """Raw samples {__key__, __shard__, field: bytes} from each shard in turn; bad shards are reported."""
    for url in shard_urls:
        bad.shard_started(url)
        for key, fields in iter_shard(url, bad.report):
            yield {"__key__": key, "__shard__": url, **fields}


def select_modality(samples: Iterable[dict], modality: str) -> Iterator[dict]:
    """Raw samples whose .json names `modality` (one source of a per-modality mixture over shared
    shards). Samples without a readable .json are dropped here; an unfiltered reader reports them."""
    import json

    for s in samples:
        try:
            if json.loads(s["json"]).get("modality") == modality:
                yield s
        except (KeyError, ValueError, AttributeError, TypeError):
            continue


def shuffle_buffer(samples: Iterable[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle: keep `size` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = s
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def mix_streams(streams: list[Iterator[dict]], weights: list[float], rng: np.random.Generator) -> Iterator[dict]:
    """Draw each sample from stream i with probability weights[i]; a finished stream drops out."""
    streams, weights = list(streams), np.asarray(weights, dtype=np.float64)
    live = list(range(len(streams)))
    while live:
        p = weights[live] / weights[live].sum()
        j = live[int(rng.choice(len(live), p=p))]
        try:
            yield next(streams[j])
        except StopIteration:
            live.remove(j)


def count_and_skip(samples: Iterable[dict], position: WorkerPosition, skip: int, bad: BadDataLog) -> Iterator[dict]:
    """Count samples into position.consumed; drop the first `skip` (already delivered before a resume).

    The skipped samples are read but not decoded, and the bad-data log is muted meanwhile.
    """
    it = iter(samples)
    if skip:
        bad.muted = True
        try:
            for _ in range(skip):
                next(it)
                position.consumed += 1
        except StopIteration:
            return
        finally:
            bad.muted = False
    for s in it:
        position.consumed += 1
        # which draw of the stream this is: per-sample random choices downstream (caption dropout)
        # hash it instead of advancing a generator, so a resumed run that skips samples makes them alike
        s["__draw__"] = (position.epoch, position.consumed)
        yield s


def decode_samples(samples: Iterable[dict], bad: BadDataLog, fields: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Decode each field and run the schema checks; a bad sample is reported and skipped."""
    for raw in samples:
        key, shard = raw["__key__"], raw["__shard__"]
        bad.sample_seen()
        try:
            if "json" not in raw:
                raise SchemaError(f"sample {key!r} has no .json member")
            out = {k: v for k, v in raw.items() if k.startswith("__")}
            for f, data in raw.items():
                if not f.startswith("__") and (fields is None or f in fields or f == "json"):
                    out[f] = decode_field(f, data)
            check_meta(key, out["json"])
            if fields is None:
                check_sample(key, out)
        except DecodeError as e:
            bad.report("undecodable", shard, key, str(e))
            continue
        except (SchemaError, KeyError, TypeError, AttributeError, ValueError) as e:
            bad.report("invalid", shard, key, str(e))
            continue
        yield out


def tokenize(samples: Iterable[dict], tokenize_fn: Callable[[dict], object], bad: BadDataLog) -> Iterator[dict]:
    """The tokenizer hook: tokenize_fn(sample) -> 1-D int tokens (None skips the sample)."""
    for s in samples:
        try:
            tokens = tokenize_fn(s)
        except Exception as e:  # a tokenizer that fails on one sample should not stop training
            bad.report("untokenizable", s["__shard__"], s["__key__"], f"{type(e).__name__}: {e}")
            continue
        if tokens is None:
            continue
        s["tokens"] = np.asarray(tokens, dtype=np.int64).reshape(-1)
        yield s


PACK_MODES = ("concat", "whole")


def pack_sequences(samples: Iterable[dict], seq_len: int, position: WorkerPosition, pad_id: int = 0,
                   pad_last: bool = True, mode: str = "concat") -> Iterator[dict]:
    """Cut samples' tokens into fixed-length sequences.

    mode "concat": concatenate and cut every seq_len tokens; a sample that straddles a cut is split,
    its tail starting the next sequence without its head (no padding).
    mode "whole": never split a sample that fits in one sequence. Each sequence is filled first-fit
    from the pending samples, oldest first (the oldest always goes first, so nothing waits forever);
    what fits nowhere is left for the next sequence and the gap is padded. Samples are pulled until
    a sequence's worth is pending beyond the one being filled, so there is a choice of fillers. A
    sample longer than seq_len starts an empty sequence and its tail continues in the next. Use it
    when a sample's head conditions its tail (a caption and its image): a split sample trains the
    tail without its condition.

    Each sequence: `tokens` (seq_len,), `segment_ids` (seq_len,) numbering the pieces inside it
    (-1 on padding), `source_ids` (seq_len,) the mixture source each token came from (a sample's
    `__source__`, 0 without one; -1 on padding), `__key__` the list of sample keys it holds. The
    tokens not yet emitted live in position.leftover, so a saved state carries them.
    """
    if mode not in PACK_MODES:
        raise ValueError(f"pack_sequences: mode must be one of {PACK_MODES}, got {mode!r}")
    carry = position.leftover  # [[key, tokens], ...], shared with the position on purpose
    whole = mode == "whole"

    def emit() -> dict:
        tokens = np.full(seq_len, pad_id, dtype=np.int64)
        segments = np.full(seq_len, -1, dtype=np.int32)
        sources = np.full(seq_len, -1, dtype=np.int16)
        keys, filled, i = [], 0, 0
        while i < len(carry) and filled < seq_len:
            key, toks, src = carry[i]
            room = seq_len - filled
            if whole and len(toks) > room and not (filled == 0 and len(toks) > seq_len):
                i += 1          # does not fit here, but would fit whole in a later sequence
                continue
            n = min(len(toks), room)
            tokens[filled:filled + n] = toks[:n]
            segments[filled:filled + n] = len(keys)
            sources[filled:filled + n] = src
            keys.append(key)
            filled += n
            if n == len(toks):
                carry.pop(i)
            else:
                carry[i] = [key, toks[n:], src]
        return {"tokens": tokens, "segment_ids": segments, "source_ids": sources, "__key__": keys}

    def pending() -> int:
        return sum(len(e[1]) for e in carry)

    ready = 2 * seq_len if whole else seq_len
    for s in samples:
        carry.append([s["__key__"], [int(t) for t in s["tokens"]], int(s.get("__source__", 0))])
        while pending() >= ready:
            yield emit()
    while pad_last and carry:
        yield emit()


def batch_items(items: Iterable[dict], batch_size: int, collate: Callable[[list], dict],
                drop_last: bool = False) -> Iterator[dict]:
    batch: list = []
    for it in items:
        batch.append(it)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)


def collate_samples(batch: list[dict]) -> dict:
    """Decoded samples: keys listed, samples kept as dicts (their fields differ by modality)."""
    return {"__key__": [s["__key__"] for s in batch], "samples": batch}


def collate_packed(batch: list[dict]) -> dict:
    import torch

    return {"tokens": torch.from_numpy(np.stack([b["tokens"] for b in batch])),
            "segment_ids": torch.from_numpy(np.stack([b["segment_ids"] for b in batch])),
            "source_ids": torch.from_numpy(np.stack([b["source_ids"] for b in batch])),
            "__key__": [b["__key__"] for b in batch]}


def utf8_byte_tokens(sample: dict):
    """A tokenizer hook for tests and demos: the UTF-8 bytes of the sample's text (None if it has none)."""
    text = sample.get("txt")
    return None if text is None else list(text.encode("utf-8"))
