"""ShardDataset wires the pipeline stages per worker; ShardLoader runs it and keeps the state.

    ds = ShardDataset("shards/image-{000000..000009}.tar", seed=0, shuffle_buffer=100, batch_size=8)
    loader = ShardLoader(ds, num_workers=2)
    for batch in loader: ...            # batch["__key__"], batch["samples"] (or tokens with packing)
    state = loader.state_dict()         # JSON-able; save it with the checkpoint
    loader.load_state_dict(state)       # in a new process: continues exactly where it left off

Workers and ranks. Worker w of rank r is global worker g = r * num_workers + w of
G = world_size * num_workers. Each epoch's shard order is drawn from (seed, epoch) and is the same
everywhere; rank r takes every world_size-th shard of it and worker w every num_workers-th of
those, so workers read disjoint shards that together cover the list. With `resampled=True`
every worker draws shards with replacement from its own random stream instead (use it for
mixtures, or with more workers than shards).

Resume. Each batch carries its worker's WorkerPosition and bad-data counts; the loader keeps
the latest per worker, as of the last batch it handed out (batches still in the prefetch queue
do not count, so nothing is skipped). torch's DataLoader takes batches from workers in turn;
the loader records which worker is next and, on resume, renames workers so that that one is
worker 0: the resumed run yields the same batches in the same order as an uninterrupted one.
(Once a worker runs out near the end of an epoch, the order of the remaining batches may
differ after a resume; the set of samples does not.) A resumed worker rereads, without
decoding, the part of the current epoch it had already delivered.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfm.data import pipeline as P
from mmfm.data.baddata import BadDataLog, BadDataPolicy, format_summary, merge_snapshots
from mmfm.data.shards import expand_shards

log = logging.getLogger("mmfm.data")
STATE_FORMAT = 1


@dataclass
class Source:
    """One dataset of a mixture: its shards and its weight (relative; normalised over sources).
    modality: only the samples whose .json names it (a per-modality source over shared shards)."""
    shards: object
    weight: float = 1.0
    name: str | None = None
    modality: str | None = None


def _dist_rank_world(rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _identity(x):
    return x


class ShardDataset(IterableDataset):
    def __init__(self, sources, *, seed: int = 0, shuffle_shards: bool = True, shuffle_buffer: int = 0,
                 resampled: bool = False, samples_per_epoch: int | None = None, loop: bool = False,
                 rank: int | None = None, world_size: int | None = None, decode: bool = True,
                 fields: tuple[str, ...] | None = None, tokenize: Callable | None = None, seq_len: int | None = None,
                 pad_id: int = 0, batch_size: int = 1, drop_last: bool = False, collate: Callable | None = None,
                 bad_data: BadDataPolicy | None = None, pack: str = "concat"):
        if not isinstance(sources, (list, tuple)) or (sources and not isinstance(sources[0], Source)):
            sources = [Source(sources)]
        self.sources = [Source(expand_shards(s.shards), float(s.weight), s.name or f"source{i}", s.modality)
                        for i, s in enumerate(sources)]
        for s in self.sources:
            if s.weight <= 0:
                raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
            if not s.shards:
                raise ValueError(f"source {s.name!r}: no shards")
        if resampled and not loop and samples_per_epoch is None:
            raise ValueError("resampled=True draws shards forever: give samples_per_epoch or loop=True")
        if seq_len is not None and tokenize is None:
            raise ValueError("seq_len (packing) needs a tokenize function")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seed, self.shuffle_shards, self.shuffle_buffer = int(seed), shuffle_shards, int(shuffle_buffer)
        self.resampled, self.samples_per_epoch, self.loop = resampled, samples_per_epoch, loop
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.decode, self.fields, self.tokenize_fn = decode, fields, tokenize
        if pack not in P.PACK_MODES:
            raise ValueError(f"pack must be one of {P.PACK_MODES}, got {pack!r}")
        self.seq_len, self.pad_id, self.batch_size, self.drop_last = seq_len, pad_id, batch_size, drop_last
        self.pack = pack
        self.collate = collate or (P.collate_packed if seq_len else P.collate_samples)
        self.bad_policy = bad_data or BadDataPolicy()
        self.num_workers = 1      # set by ShardLoader
        self.start_epoch = 0
        self.resume: dict = {}    # logical worker -> {"position": ..., "bad": ...}
        self.worker_offset = 0    # physical worker w plays logical worker (w + offset) % num_workers

    # -- the per-worker stream ---------------------------------------------------------------
    def worker_shards(self, source: Source, epoch: int, worker: int) -> list[str]:
        order = P.epoch_shard_order(source.shards, self.seed, epoch, self.shuffle_shards)
        return P.split_by_worker(P.split_by_node(order, self.rank, self.world_size), worker, self.num_workers)

    def raw_stream(self, epoch: int, worker: int, bad: BadDataLog):
        """The shuffled (and mixed) raw samples of one epoch for logical worker `worker` of this rank."""
        g = self.rank * self.num_workers + worker
        streams = []
        for i, src in enumerate(self.sources):
            if self.resampled:
                shard_urls = P.resampled_shards(src.shards, P.make_rng(self.seed, epoch, g, P.PURPOSE_RESAMPLE, i))
            else:
                shard_urls = self.worker_shards(src, epoch, worker)
            samples = P.read_samples(shard_urls, bad)
            if src.modality is not None:
                samples = P.select_modality(samples, src.modality)
            if len(self.sources) > 1:   # which source each sample came from (the packer's source_ids)
                samples = _tag_source(samples, i)
            streams.append(P.shuffle_buffer(samples, self.shuffle_buffer,
                                            P.make_rng(self.seed, epoch, g, P.PURPOSE_SHUFFLE, i)))
        stream = streams[0] if len(streams) == 1 else P.mix_streams(
            streams, [s.weight for s in self.sources], P.make_rng(self.seed, epoch, g, P.PURPOSE_MIX))
        if self.samples_per_epoch is not None:
            stream = itertools.islice(stream, self.samples_per_epoch)
        return stream

    def epochs_stream(self, worker: int, position: P.WorkerPosition, bad: BadDataLog):
        """Raw samples across epochs (one epoch unless loop), fast-forwarded to `position`."""
        epoch, skip = position.epoch, position.consumed
        while True:
            position.epoch, position.consumed = epoch, 0
            yield from P.count_and_skip(self.raw_stream(epoch, worker, bad), position, skip, bad)
            if not self.loop:
                return
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardDataset was set up for {self.num_workers} workers but runs in "
                               f"{info.num_workers}: iterate it through ShardLoader")
        worker = (physical + self.worker_offset) % self.num_workers
        saved = self.resume.get(worker, {})
        position = P.WorkerPosition.from_dict(saved["position"]) if "position" in saved else \
            P.WorkerPosition(epoch=self.start_epoch)
        bad = BadDataLog(self.bad_policy, worker=f"{self.rank}.{worker}")
        bad.restore(saved.get("bad"))
        if not self.resampled and not any(self.worker_shards(s, position.epoch, worker) for s in self.sources):
            log.warning("rank %d worker %d has no shards (%d shards for %d workers in all): it yields nothing; "
                        "use resampled=True or fewer workers", self.rank, worker,
                        sum(len(s.shards) for s in self.sources), self.world_size * self.num_workers)
        items = self.epochs_stream(worker, position, bad)
        if self.decode:
            items = P.decode_samples(items, bad, self.fields)
        if self.tokenize_fn is not None:
            items = P.tokenize(items, self.tokenize_fn, bad)
        if self.seq_len:
            items = P.pack_sequences(items, self.seq_len, position, self.pad_id, mode=self.pack)
        for batch in P.batch_items(items, self.batch_size, self.collate, self.drop_last):
            batch["__worker__"] = worker
            batch["__position__"] = position.to_dict()
            batch["__bad__"] = bad.snapshot()
            yield batch
        # problems found after the last batch (a bad last shard) still reach the summary
        yield {"__trailer__": True, "__worker__": worker, "__position__": position.to_dict(), "__bad__": bad.snapshot()}

    def shards_digest(self) -> str:
        h = hashlib.sha1()
        for s in self.sources:
            h.update(f"{s.name}:{s.weight}:".encode() + (f"{s.modality}:".encode() if s.modality else b""))
            for u in s.shards:
                h.update(u.encode() + b"\n")
        return h.hexdigest()[:16]


def _tag_source(samples, index: int):
    for s in samples:
        s["__source__"] = index
        yield s


class ShardLoader:
    """Iterates a ShardDataset (through torch's DataLoader when num_workers > 0) and tracks its state."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, prefetch_factor: int | None = None,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        dataset.num_workers = max(1, num_workers)
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.positions: dict[int, dict] = {}
        self.bad: dict[int, dict] = {}
        self.next_worker = 0
        self.batches = 0
        self.epoch = 0  # the epoch an unlooped iteration runs

    def _configure_dataset(self) -> None:
        ds = self.dataset
        ds.start_epoch = self.epoch
        ds.worker_offset = self.next_worker
        ds.resume = {w: {"position": self.positions[w], "bad": self.bad.get(w)} for w in self.positions}

    def __iter__(self):
        self._configure_dataset()
        if self.num_workers == 0:
            it = iter(self.dataset)
        else:
            kw = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor else {}
            it = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                 pin_memory=self.pin_memory, **kw))
        nw = self.dataset.num_workers
        for batch in it:
            w = batch.pop("__worker__")
            self.positions[w] = batch.pop("__position__")
            self.bad[w] = batch.pop("__bad__")
            if batch.pop("__trailer__", False):
                continue  # a worker's end-of-stream report, not a batch
            self.next_worker = (w + 1) % nw
            self.batches += 1
            yield batch
        if not self.dataset.loop:  # a finished pass: the next one starts the next epoch afresh
            self.epoch += 1
            self.positions, self.next_worker = {}, 0
            summary = self.bad_data_summary()
            if summary["bad_samples"] or summary["failed_shards"]:
                print(format_summary(summary), file=sys.stderr)

    def bad_data_summary(self) -> dict:
        return merge_snapshots(self.bad.values())

    def state_dict(self) -> dict:
        ds = self.dataset
        shard_order = {}
        for w in range(ds.num_workers):
            epoch = self.positions.get(w, {}).get("epoch", self.epoch)
            if not ds.resampled:
                shard_order[str(w)] = {s.name: [os.path.basename(u) for u in ds.worker_shards(s, epoch, w)]
                                       for s in ds.sources}
        return {"format": STATE_FORMAT, "seed": ds.seed, "rank": ds.rank, "world_size": ds.world_size,
                "num_workers": ds.num_workers, "resampled": ds.resampled, "loop": ds.loop,
                "shards_digest": ds.shards_digest(), "epoch": self.epoch, "batches": self.batches,
                "next_worker": self.next_worker,
                "workers": {str(w): {"position": p, "bad": self.bad.get(w)} for w, p in self.positions.items()},
                "shard_order": shard_order}

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        for name, mine in (("seed", ds.seed), ("rank", ds.rank), ("world_size", ds.world_size),
                           ("num_workers", ds.num_workers), ("resampled", ds.resampled), ("loop", ds.loop),
                           ("shards_digest", ds.shards_digest())):
            if state[name] != mine:
                raise ValueError(f"loader state: {name} was {state[name]!r} when saved, is {mine!r} now; "
                                 "resuming exactly needs the same data, seed and layout")
        self.epoch, self.batches, self.next_worker = state["epoch"], state["batches"], state["next_worker"]
        self.positions = {int(w): v["position"] for w, v in state["workers"].items()}
        self.bad = {int(w): v["bad"] for w, v in state["workers"].items() if v.get("bad")}
