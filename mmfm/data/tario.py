"""Reading tar shards member by member, without letting a bad shard stop the caller.

`iter_shard(url, report)` yields `(key, {field: bytes})` for each complete sample of one
shard, opened through webdataset's `gopen` (local paths, `file:`, `pipe:` commands, and the
object-store schemes webdataset knows). It never raises for bad data; it calls
`report(kind, shard, key, detail)` instead:

  unopenable_shard  the shard cannot be opened or is not a tar (then nothing is yielded)
  truncated_shard   the tar ends mid-member; the sample being read is dropped
  unsafe_member     a member name with `..` or an absolute path; the member is skipped
  bad_member_name   a member name without a `.field` extension; skipped
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterator

import webdataset as wds

from mmfm.data.schema import SchemaError, is_safe_member_name, split_member_name

Report = Callable[[str, str, str, str], None]


def _open(url: str):
    return wds.gopen(url, "rb")


class _CountingReader:
    """Counts the bytes a stream delivers: Python's tarfile, reading a stream, takes a tar cut
    at a header for a normal end, so the end is checked against the byte count instead."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0

    def read(self, n=-1):
        data = self.stream.read(n)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def _block_end(member: tarfile.TarInfo) -> int:
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def iter_shard(url: str, report: Report) -> Iterator[tuple[str, dict]]:
    try:
        stream = _open(url)
    except Exception as e:  # FileNotFoundError, PermissionError, a scheme gopen does not know, ...
        report("unopenable_shard", url, "", f"{type(e).__name__}: {e}")
        return
    finished = False  # a consumer that stops early closes a pipe: early; that is not an error
    try:
        counted = _CountingReader(stream)
        try:
            tar = tarfile.open(fileobj=counted, mode="r|")
        except Exception as e:
            report("unopenable_shard", url, "", f"not a readable tar: {type(e).__name__}: {e}")
            return
        key, fields, data_end = None, {}, 0
        try:
            for member in tar:
                data_end = _block_end(member)
                if not member.isfile():
                    continue
                name = member.name
                if not is_safe_member_name(name):
                    report("unsafe_member", url, name, "member name is absolute or contains '..'; skipped")
                    continue
                try:
                    mkey, field = split_member_name(name)
                except SchemaError as e:
                    report("bad_member_name", url, name, str(e))
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if mkey != key:
                    if key is not None:
                        yield key, fields
                    key, fields = mkey, {}
                fields[field] = data
            counted.drain()
            # a complete tar ends with two zero blocks after the last member's data
            if counted.bytes < data_end + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"archive ends at byte {counted.bytes} without its end-of-archive blocks")
        except (tarfile.TarError, EOFError, OSError) as e:
            report("truncated_shard", url, key or "", f"{type(e).__name__}: {e}; sample dropped, rest of shard skipped")
            return
        if key is not None:
            yield key, fields
        finished = True
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that exited non-zero is reported on close
            if finished:
                report("unopenable_shard", url, "", f"closing the stream failed: {type(e).__name__}: {e}")
