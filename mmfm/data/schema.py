"""The shard schema: which fields each modality carries and what its `.json` must record.

A shard is a plain tar file in webdataset layout: one sample per key, one member per field,
named `<key>.<field>` (for example `cat_0001.png`, `cat_0001.txt`, `cat_0001.json`). Every
sample has a `.json` with at least `modality`, `source` and `license`; the per-modality keys
below are checked by the writer (so a shard never holds a sample its reader would reject)
and by the reader's decode stage (so a hand-made shard gets the same checks).
docs/data.md is the readable version of this file; keep them in step.
"""
from __future__ import annotations

import posixpath
import re

MODALITIES = ("text", "image", "audio", "video", "shape3d", "physics")

# The field that holds each modality's payload (one of them must be present), and the
# optional text that travels with it (caption, transcript, description).
PRIMARY_FIELDS = {
    "text": ("txt",),
    "image": ("png", "jpg", "jpeg", "webp"),
    "audio": ("wav", "flac", "ogg", "mp3", "m4a", "aac", "opus"),  # the original encoded bytes
    "video": ("mp4", "webm", "mkv", "mov", "npz"),  # the original encoded clip; or npz `frames` (T, H, W, 3) uint8
    "shape3d": ("npz", "ply"),  # npz: `points` (N, 3), `normals` (N, 3), optional `faces` (F, 3)
    "physics": ("npz",),        # npz: `fields` (T, C, *grid), optional `t`, `x`, `y` coordinates
}

# Metadata every sample records, and what each modality adds. Values are the accepted types.
COMMON_META = {"modality": str, "source": str, "license": str}
MODALITY_META = {
    "text": {},
    "image": {"width": int, "height": int},
    "audio": {"sample_rate": int, "num_samples": int},
    "video": {"fps": (int, float), "num_frames": int, "width": int, "height": int},
    "shape3d": {"num_points": int},
    "physics": {"channel_names": list, "grid_spacing": list, "time_step": (int, float), "parameters": dict},
}

KNOWN_FIELDS = ("txt", "json", "png", "jpg", "jpeg", "webp", "wav", "flac", "ogg", "mp3", "m4a", "aac", "opus", "mp4",
                "webm", "mkv", "mov", "npz", "npy", "ply")

# A key is a relative POSIX path without dots in its last component: webdataset splits
# `dir/key.field.ext` at the first dot after the last slash, so a dot would move part of the
# key into the field name. Absolute paths and `..` are refused so that nobody who extracts a
# shard can have a member written outside the target folder.
_KEY_PART = re.compile(r"^[A-Za-z0-9_\-]+$")
_FIELD = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


class SchemaError(ValueError):
    """A sample that does not follow the schema; the message names the key and the field."""


def check_key(key: str) -> str:
    """Return `key` if it is a safe sample key, else raise SchemaError saying why."""
    if not isinstance(key, str) or not key:
        raise SchemaError(f"sample key must be a non-empty string, got {key!r}")
    if key.startswith("/") or key.startswith("\\") or re.match(r"^[A-Za-z]:", key):
        raise SchemaError(f"sample key {key!r} is an absolute path; keys must be relative")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise SchemaError(f"sample key {key!r} has an empty, '.' or '..' path component")
    for p in parts:
        if not _KEY_PART.match(p):
            raise SchemaError(f"sample key {key!r}: component {p!r} may hold only letters, digits, '_' and '-'")
    return key


def check_field_name(key: str, field: str) -> str:
    if not _FIELD.match(field):
        raise SchemaError(f"sample {key!r}: field name {field!r} must be lower-case letters, digits, '_' and dots")
    return field


def is_safe_member_name(name: str) -> bool:
    """True if a tar member name stays inside the folder it would be extracted to."""
    if not name or name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        return False
    norm = posixpath.normpath(name)
    return not (norm == ".." or norm.startswith("../") or "/../" in f"/{name}/")


def safe_join(root: str, member_name: str) -> str:
    """Path of `member_name` under `root`; raises SchemaError if it would land outside root."""
    import os

    if not is_safe_member_name(member_name):
        raise SchemaError(f"tar member {member_name!r} would be written outside {root!r}")
    target = os.path.realpath(os.path.join(root, member_name))
    base = os.path.realpath(root)
    if os.path.commonpath([base, target]) != base:
        raise SchemaError(f"tar member {member_name!r} would be written outside {root!r}")
    return target


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.field.ext` -> (`dir/key`, `field.ext`), as webdataset splits it."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not m:
        raise SchemaError(f"tar member {name!r} has no field extension (expected <key>.<field>)")
    return m.group(1), m.group(2)


def primary_field(modality: str, fields) -> str:
    """The field holding the payload of a sample of `modality`, among `fields`."""
    for f in PRIMARY_FIELDS[modality]:
        if f in fields:
            return f
    raise SchemaError(f"a {modality} sample needs one of the fields {', '.join(PRIMARY_FIELDS[modality])}")


def check_meta(key: str, meta: dict) -> dict:
    """Check a sample's `.json` metadata against COMMON_META and MODALITY_META."""
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key!r}: .json must hold an object, got {type(meta).__name__}")
    modality = meta.get("modality")
    if modality not in MODALITIES:
        raise SchemaError(f"sample {key!r}: json field 'modality' is {modality!r}; expected one of {', '.join(MODALITIES)}")
    for name, types in {**COMMON_META, **MODALITY_META[modality]}.items():
        if name not in meta:
            raise SchemaError(f"sample {key!r}: json field {name!r} is missing (required for {modality})")
        if not isinstance(meta[name], types) or isinstance(meta[name], bool):
            raise SchemaError(f"sample {key!r}: json field {name!r} has type {type(meta[name]).__name__}")
    if modality == "physics" and len(meta["grid_spacing"]) not in (1, 2, 3):
        raise SchemaError(f"sample {key!r}: json field 'grid_spacing' must list 1 to 3 spacings")
    return meta
