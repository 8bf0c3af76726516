"""Bad data: skipped, counted, logged with shard and key, summarised; fatal only past a threshold.

Each reader worker keeps one BadDataLog. Every problem is logged (the first
`LOG_FIRST` per worker, then every `LOG_EVERY`-th, so a rotten shard does not flood the log)
and kept in `entries` (capped) for the end-of-run summary. `check()` raises
BadDataThresholdExceeded, naming the worst shards, when
  - bad samples / samples seen > policy.max_bad_fraction (once min_samples have been seen), or
  - failed shards / shards attempted > policy.max_failed_shard_fraction (once min_shards
    have been attempted): a shard that cannot be opened is otherwise a warning, then the
    next shard.
While a resumed worker fast-forwards over data it already delivered, the log is `muted` so
nothing is counted twice (the counts come back from the saved state instead).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("mmfm.data")

LOG_FIRST = 20
LOG_EVERY = 100
MAX_ENTRIES = 200

SHARD_KINDS = ("unopenable_shard",)


class BadDataThresholdExceeded(RuntimeError):
    pass


@dataclass
class BadDataPolicy:
    max_bad_fraction: float = 0.05
    min_samples: int = 50
    max_failed_shard_fraction: float = 0.5
    min_shards: int = 2


class BadDataLog:
    def __init__(self, policy: BadDataPolicy | None = None, worker: str = ""):
        self.policy = policy or BadDataPolicy()
        self.worker = worker
        self.muted = False
        self.samples_seen = 0
        self.bad_samples = 0
        self.shards_attempted = 0
        self.failed_shards: list[str] = []
        self.counts: Counter = Counter()
        self.per_shard: Counter = Counter()
        self.entries: list[dict] = []

    # -- events ---------------------------------------------------------------------------
    def shard_started(self, url: str) -> None:
        if not self.muted:
            self.shards_attempted += 1

    def sample_seen(self) -> None:
        if not self.muted:
            self.samples_seen += 1

    def report(self, kind: str, shard: str, key: str, detail: str) -> None:
        """One problem: a bad sample, or (kind in SHARD_KINDS) a shard that failed to open."""
        if self.muted:
            return
        self.counts[kind] += 1
        self.per_shard[shard] += 1
        if kind in SHARD_KINDS:
            self.failed_shards.append(shard)
        else:
            self.bad_samples += 1
            self.samples_seen += 1 if kind in ("truncated_shard", "unsafe_member", "bad_member_name") else 0
        if len(self.entries) < MAX_ENTRIES:
            self.entries.append({"kind": kind, "shard": shard, "key": key, "detail": detail})
        n = sum(self.counts.values())
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            where = f"worker {self.worker}: " if self.worker else ""
            log.warning("%s%s in %s%s: %s%s", where, kind, shard, f" key {key}" if key else "", detail,
                        f" ({n} problems so far)" if n > LOG_FIRST else "")
        self.check()

    def check(self) -> None:
        p = self.policy
        if self.samples_seen >= p.min_samples and self.bad_samples > p.max_bad_fraction * self.samples_seen:
            raise BadDataThresholdExceeded(
                f"bad data: {self.bad_samples} of {self.samples_seen} samples bad "
                f"({self.bad_samples / self.samples_seen:.1%} > max_bad_fraction {p.max_bad_fraction:.1%}); "
                f"worst shards: {self._worst_shards()}; kinds: {dict(self.counts)}")
        if (self.shards_attempted >= p.min_shards
                and len(self.failed_shards) > p.max_failed_shard_fraction * self.shards_attempted):
            raise BadDataThresholdExceeded(
                f"bad data: {len(self.failed_shards)} of {self.shards_attempted} shards could not be opened "
                f"(> max_failed_shard_fraction {p.max_failed_shard_fraction:.0%}): {', '.join(self.failed_shards[:10])}")

    def _worst_shards(self, n: int = 5) -> str:
        return ", ".join(f"{s} ({c})" for s, c in self.per_shard.most_common(n))

    # -- state ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"samples_seen": self.samples_seen, "bad_samples": self.bad_samples,
                "shards_attempted": self.shards_attempted, "failed_shards": list(self.failed_shards),
                "counts": dict(self.counts), "per_shard": dict(self.per_shard), "entries": list(self.entries)}

    def restore(self, snap: dict | None) -> None:
        if not snap:
            return
        self.samples_seen = snap["samples_seen"]
        self.bad_samples = snap["bad_samples"]
        self.shards_attempted = snap["shards_attempted"]
        self.failed_shards = list(snap["failed_shards"])
        self.counts = Counter(snap["counts"])
        self.per_shard = Counter(snap["per_shard"])
        self.entries = list(snap["entries"])


def merge_snapshots(snaps) -> dict:
    """One summary from the workers' snapshots (what ShardLoader.bad_data_summary returns)."""
    out = {"samples_seen": 0, "bad_samples": 0, "shards_attempted": 0, "failed_shards": [], "counts": Counter(),
           "per_shard": Counter(), "entries": []}
    for s in snaps:
        for k in ("samples_seen", "bad_samples", "shards_attempted"):
            out[k] += s[k]
        out["failed_shards"] += s["failed_shards"]
        out["counts"].update(s["counts"])
        out["per_shard"].update(s["per_shard"])
        out["entries"] += s["entries"]
    out["counts"], out["per_shard"] = dict(out["counts"]), dict(out["per_shard"])
    return out


def format_summary(summary: dict) -> str:
    if not summary["bad_samples"] and not summary["failed_shards"]:
        return f"bad data: none in {summary['samples_seen']} samples"
    lines = [f"bad data: {summary['bad_samples']} of {summary['samples_seen']} samples skipped, "
             f"{len(summary['failed_shards'])} of {summary['shards_attempted']} shards unopenable; "
             f"by kind: {summary['counts']}"]
    for e in summary["entries"][:20]:
        lines.append(f"  {e['kind']:<17} {e['shard']}  {e['key'] or '-'}  {e['detail']}")
    return "\n".join(lines)
