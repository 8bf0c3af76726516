"""Writing samples into tar shards, atomically.

`SampleShardWriter` is webdataset's ShardWriter with three changes:
  - a shard is written to `<name>.tmp` and renamed when complete, so a reader or a crashed
    build never sees a half-written shard under its final name;
  - a shard is opened only when its first sample arrives (no empty trailing shard);
  - every sample is checked before a byte is written: a safe key (no `..`, no absolute
    path), known field names, the .json metadata of its modality, and values that decode
    back and pass the reader's checks. A rejected sample raises SchemaError; the shard stays
    valid.
Members get a fixed mtime so that the same samples give byte-identical shards.
At close, `<prefix>-manifest.json` lists the shards with their sample counts and sizes.
"""
from __future__ import annotations

import os

import webdataset as wds

from mmfm.data.codecs import check_sample, decode_field, encode_field
from mmfm.data.schema import SchemaError, check_field_name, check_key, check_meta
from mmfm.jsonio import write_json

FIXED_MTIME = 1_700_000_000  # reproducible shards: the same samples give the same bytes


class SampleShardWriter(wds.ShardWriter):
    def __init__(self, out_dir: str, prefix: str = "shard", shard_size: int = 1000, max_bytes: float = 1e9,
                 verify_decode: bool = True):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        check_key(prefix)
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.prefix = prefix
        self.verify_decode = verify_decode
        self.shards: list[dict] = []
        self.modality_counts: dict[str, int] = {}
        self._keys: set[str] = set()
        self._opening = False  # ShardWriter.__init__ opens a stream at once; we open lazily
        super().__init__(os.path.join(out_dir, f"{prefix}-%06d.tar"), maxcount=shard_size, maxsize=max_bytes,
                         verbose=0, opener=self._open_tmp, post=self._publish, mtime=FIXED_MTIME, encoder=False)
        self._opening = True

    def next_stream(self):
        if not self._opening:
            return
        super().next_stream()

    def _open_tmp(self, fname: str):
        return open(fname + ".tmp", "wb")

    def _publish(self, fname: str) -> None:
        os.replace(fname + ".tmp", fname)
        self.shards.append({"name": os.path.basename(fname), "samples": self.count, "bytes": os.path.getsize(fname)})

    def finish(self):
        if self.tarstream is not None and self.tarstream.own_fileobj is None:
            # our opener's file object: TarWriter does not close what it did not open
            stream = self.tarstream.stream
            self.tarstream.close()
            stream.close()
            self.tarstream = None
            self.post(self.fname)
            return
        super().finish()

    def encode_sample(self, sample: dict) -> dict:
        """Check `sample` against the schema and return it with every field as bytes."""
        key = check_key(sample.get("__key__", ""))
        if key in self._keys:
            raise SchemaError(f"sample key {key!r} written twice to {self.prefix}")
        meta = check_meta(key, sample.get("json"))
        encoded = {"__key__": key}
        for field, value in sample.items():
            if field.startswith("__"):
                continue
            check_field_name(key, field)
            encoded[field] = encode_field(field, value, meta)
        if self.verify_decode:
            check_sample(key, {f: decode_field(f, b) for f, b in encoded.items() if f != "__key__"})
        return encoded

    def write(self, sample: dict) -> None:
        encoded = self.encode_sample(sample)
        super().write(encoded)
        self._keys.add(encoded["__key__"])
        m = sample["json"]["modality"]
        self.modality_counts[m] = self.modality_counts.get(m, 0) + 1

    def close(self):
        self.finish()
        manifest = {"prefix": self.prefix, "shards": self.shards, "samples": sum(s["samples"] for s in self.shards),
                    "bytes": sum(s["bytes"] for s in self.shards), "modalities": self.modality_counts}
        path = os.path.join(self.out_dir, f"{self.prefix}-manifest.json")
        write_json(path, manifest)
        self.manifest = manifest
        return manifest

    def __exit__(self, exc_type, *args):
        if exc_type is None:
            self.close()
        else:  # leave no .tmp behind, and publish nothing half-made
            if self.tarstream is not None:
                try:
                    self.tarstream.tarstream.close()
                    self.tarstream.stream.close()
                finally:
                    if os.path.exists(self.fname + ".tmp"):
                        os.remove(self.fname + ".tmp")
                    self.tarstream = None
