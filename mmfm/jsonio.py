"""The one writer of JSON files that others read back: records (`--json PATH`, docs/records.md),
summaries, reports, manifests.

The text goes to a temporary file in the target's folder and is renamed over the target with
os.replace, so a reader (or a run killed half-way) sees the old file or the new one, never a
truncated one. The temporary name is unique per call, so two processes writing the same path do
not write into each other's temporary file; the last rename wins.
"""
from __future__ import annotations

import json
import os
import sys
import uuid


def write_json(path, obj, indent: int | None = 1) -> str:
    """Write `obj` as JSON to `path` atomically; returns the path. Raises TypeError (naming the
    path) for an object JSON cannot hold, before the target is touched."""
    path = os.fspath(path)
    try:
        text = json.dumps(obj, indent=indent)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{path}: cannot write as JSON: {exc}") from None
    # beside the target (a rename across file systems is not atomic); open(..., "x") rather than
    # mkstemp, so the file gets the umask's permissions like any other output, not 0600
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_records(records: list[dict], path) -> None:
    """`--json PATH` of the benchmarks and evaluations: the records (docs/records.md) as one JSON
    list, written atomically, and a line on stderr saying so; nothing when path is empty."""
    if not path:
        return
    write_json(path, records)
    print(f"wrote {len(records)} records to {path}", file=sys.stderr)
