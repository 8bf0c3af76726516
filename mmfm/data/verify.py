"""`mmfm data verify DIR`: read every member of every shard, decode it, check it.

Prints per modality the samples and bytes, then every corrupt member with its shard and
key; the exit status is 1 if anything is corrupt or unreadable, else 0.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from mmfm.data.codecs import DecodeError, check_sample, decode_field
from mmfm.data.schema import SchemaError, check_meta
from mmfm.data.shards import expand_shards
from mmfm.data.tario import iter_shard
from mmfm.jsonio import write_json


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    per_modality: dict = field(default_factory=dict)  # modality -> {"samples": n, "bytes": b}
    problems: list = field(default_factory=list)      # {"kind", "shard", "key", "detail"}

    @property
    def ok(self) -> bool:
        return not self.problems


def check_raw_sample(key: str, raw: dict) -> dict:
    """Decode every field of a raw sample and run the schema checks; raises on the first problem."""
    if "json" not in raw:
        raise SchemaError(f"sample {key!r} has no .json member")
    decoded = {f: decode_field(f, b) for f, b in raw.items()}
    check_meta(key, decoded["json"])
    check_sample(key, decoded)
    return decoded


def verify_shards(spec, progress: bool = True) -> VerifyReport:
    from tqdm import tqdm

    report = VerifyReport()

    def on_problem(kind, shard, key, detail):
        report.problems.append({"kind": kind, "shard": shard, "key": key, "detail": detail})

    urls = expand_shards(spec)
    for url in tqdm(urls, desc="verify", unit="shard", file=sys.stderr, disable=not progress):
        report.shards += 1
        for key, raw in iter_shard(url, on_problem):
            size = sum(len(b) for b in raw.values())
            try:
                decoded = check_raw_sample(key, raw)
            except (DecodeError, SchemaError, KeyError, TypeError) as e:
                on_problem("corrupt_sample", url, key, str(e))
                continue
            m = decoded["json"]["modality"]
            entry = report.per_modality.setdefault(m, {"samples": 0, "bytes": 0})
            entry["samples"] += 1
            entry["bytes"] += size
            report.samples += 1
            report.bytes += size
    return report


def print_report(report: VerifyReport, out=None) -> None:
    out = out or sys.stdout
    print(f"{'modality':<10} {'samples':>8} {'MB':>10}", file=out)
    for m, e in sorted(report.per_modality.items()):
        print(f"{m:<10} {e['samples']:>8} {e['bytes'] / 1e6:>10.3f}", file=out)
    print(f"{'total':<10} {report.samples:>8} {report.bytes / 1e6:>10.3f}   ({report.shards} shards)", file=out)
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):", file=out)
        for p in report.problems:
            print(f"  {p['kind']:<17} {p['shard']}  {p['key'] or '-'}  {p['detail']}", file=out)
    else:
        print("all members decode and pass the schema checks", file=out)


def main(args) -> int:
    try:
        report = verify_shards(args.dir, progress=not args.quiet)
    except ValueError as e:
        print(f"mmfm data verify: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        write_json(args.json, {"shards": report.shards, "samples": report.samples, "bytes": report.bytes,
                               "per_modality": report.per_modality, "problems": report.problems})
    return 0 if report.ok else 1
