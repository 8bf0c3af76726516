"""Turning a shard specification into a list of shard URLs.

A spec is a string or a list of strings; each string is one of
  - a folder: every `*.tar` in it, sorted by name;
  - a brace pattern: `data/shards-{000000..000099}.tar` (expanded with braceexpand, as
    webdataset does); `::` separates several patterns in one string;
  - a glob: `data/*.tar`;
  - a `pipe:` command, braces included: `pipe:aws s3 cp s3://b/shards-{0..9}.tar -`;
  - any URL webdataset's gopen opens.
The same config thus names a laptop folder or a bucket of thousands of shards.
"""
from __future__ import annotations

import glob
import os

from braceexpand import braceexpand


def expand_shards(spec) -> list[str]:
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s)]
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"shard spec must be a non-empty string or list, got {spec!r}")
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise ValueError(f"shard folder {part!r} holds no *.tar files")
            urls += found
            continue
        for u in braceexpand(part):
            if not u.startswith("pipe:") and any(c in u for c in "*?["):
                found = sorted(glob.glob(u))
                if not found:
                    raise ValueError(f"shard pattern {u!r} matches no files")
                urls += found
            else:
                urls.append(u)
    return urls
