"""Where `mmfm data build` finds its inputs: a folder, a JSONL manifest, a Parquet file, or existing
webdataset shards. Each yields SourceItems (one payload plus its caption and metadata); a file
that cannot become an item is handed to `skip(reason, name, detail)`, never dropped in silence.

`--src` is read as (first match wins):
  - webdataset shards: a `pipe:` URL, `::`-joined specs, anything ending in `.tar` (a file, a
    brace pattern `shards-{000000..000099}.tar`, a glob `dir/*.tar`), or a folder holding `.tar`
    files and no payload file;
  - a `.jsonl` / `.json` manifest (or, for text, records with a text field);
  - a `.parquet` file (text: one document per row);
  - a folder (files grouped by path without extension) or one payload file.

Webdataset layouts (img2dataset: KEY.jpg KEY.txt KEY.json; video2dataset: KEY.mp4 KEY.txt KEY.json;
audio webdatasets: KEY.flac or KEY.mp3 with KEY.json / KEY.txt) are read by role: the payload (the
first of the modality's extensions a sample has), `caption` (txt) and `meta` (json). `--map
caption=txt,image=jpg;png;webp` names other fields for a role.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mmfm.data.audio import AUDIO_EXTS
from mmfm.data.hdf5 import HDF5_EXTS
from mmfm.data.images import IMAGE_EXTS
from mmfm.data.video import CONTAINER_EXTS

MESH_EXTS = ("obj", "glb", "gltf", "stl", "ply", "off")
RECORD_EXTS = ("jsonl", "parquet")  # text: one document per record
PAYLOAD_EXTS = {
    "text": ("txt", "md"),
    "image": IMAGE_EXTS,
    "audio": AUDIO_EXTS,
    "video": CONTAINER_EXTS + ("npz",),
    "shape3d": ("npz",) + MESH_EXTS,
    "physics": ("npz",) + HDF5_EXTS,
}
SIDECAR_EXTS = ("txt", "json")
# mesh files that point at others (a .gltf's buffers, an .obj's materials) travel beside them
COMPANION_EXTS = ("bin", "mtl")

Skip = Callable[[str, str, str], None]  # (reason, name, detail)


@dataclass
class SourceItem:
    key: str
    files: dict  # extension without dot -> a path, or the member's bytes (webdataset)
    text: str | None = None
    meta: dict = field(default_factory=dict)
    origin: str = ""  # what messages name: the file, or shard:key

    def payload(self, modality: str) -> str | None:
        return next((e for e in PAYLOAD_EXTS[modality] if e in self.files), None)

    def read(self, ext: str) -> bytes:
        v = self.files[ext]
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        with open(v, "rb") as f:
            return f.read()


def flat_key(rel_stem: str) -> str:
    """A safe key from a relative path: separators become '__', other odd characters '_'."""
    parts = [re.sub(r"[^A-Za-z0-9_\-]", "_", p) for p in rel_stem.replace(os.sep, "/").split("/") if p]
    return "__".join(parts) or "_"


def parse_field_map(spec: str | None, modality: str) -> dict[str, tuple[str, ...]]:
    """`caption=txt,image=jpg;png;webp` -> {role: extensions}; the defaults fill the roles not named."""
    roles = {modality: PAYLOAD_EXTS[modality], "caption": ("txt",) if modality != "text" else (), "meta": ("json",)}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        role, _, exts = part.partition("=")
        role = role.strip()
        if role == "payload":
            role = modality
        if role not in roles or not exts.strip():
            raise ValueError(f"--map {spec!r}: {part!r} must be ROLE=ext[;ext...] with ROLE one of "
                             f"{', '.join(roles)} (or 'payload')")
        roles[role] = tuple(e.strip().lower().lstrip(".") for e in exts.split(";") if e.strip())
    return roles


# -- webdataset shards ------------------------------------------------------------------------
def is_shard_spec(src: str, modality: str) -> bool:
    """A pipe: URL, `::`-joined specs, a .tar file, brace pattern or glob, or a folder of shards."""
    if src.startswith("pipe:") or "::" in src or src.endswith(".tar"):
        return True
    if os.path.isdir(src):
        names = os.listdir(src)
        has_tar = any(n.endswith(".tar") for n in names)
        accepted = PAYLOAD_EXTS[modality] + (RECORD_EXTS if modality == "text" else ())
        has_payload = any(os.path.splitext(n)[1].lower().lstrip(".") in accepted for n in names)
        return has_tar and not has_payload
    return False


def items_from_webdataset(spec: str, modality: str, field_map: dict, skip: Skip) -> Iterator[SourceItem]:
    from mmfm.data.shards import expand_shards
    from mmfm.data.tario import iter_shard

    roles = field_map
    known = set(roles[modality]) | set(roles["caption"]) | set(roles["meta"])
    unused: dict[str, int] = {}

    def report(kind, shard, key, detail):
        skip("corrupt_shard", f"{shard}:{key}" if key else shard, f"{kind}: {detail}")

    for url in expand_shards(spec):
        for key, fields in iter_shard(url, report):
            origin = f"{url}:{key}"
            fields = {k.lower(): v for k, v in fields.items()}
            for ext in fields:
                if ext not in known and ext not in unused:
                    unused[ext] = 0
                    skip("unused_field", origin, f".{ext} is not mapped to a role (payload {';'.join(roles[modality])}, "
                                                 f"caption {';'.join(roles['caption']) or '-'}, meta {';'.join(roles['meta'])}); "
                                                 f"use --map to name it. Reported once per extension")
            payload = next((e for e in roles[modality] if e in fields), None)
            if payload is None:
                skip("no_payload", origin, f"no {modality} field among .{' .'.join(sorted(fields)) or ' none'} "
                                           f"(looked for .{' .'.join(roles[modality])}; --map {modality}=EXT names another)")
                continue
            meta, text = {}, None
            jfield = next((e for e in roles["meta"] if e in fields), None)
            if jfield is not None:
                try:
                    original = json.loads(fields[jfield].decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    skip("corrupt", origin, f".{jfield} is not JSON ({e})")
                    continue
                meta["source_meta"] = original  # the tool's own metadata (url, caption, status, ...), kept whole
                if isinstance(original, dict) and isinstance(original.get("license"), str):
                    meta["license"] = original["license"]
            cfield = next((e for e in roles["caption"] if e in fields), None)
            if cfield is not None:
                text = fields[cfield].decode("utf-8", errors="replace").strip()
            files = {payload: fields[payload]}
            yield SourceItem(flat_key(key), files, text, {"source": origin, **meta}, origin)


# -- manifests, Parquet, folders --------------------------------------------------------------
def _record_key(rec: dict, default: str) -> str:
    for k in ("key", "id", "__key__"):
        if isinstance(rec.get(k), (str, int)) and str(rec[k]):
            return str(rec[k])
    return default


def items_from_jsonl(path: str, modality: str, text_field: str, skip: Skip, key_prefix: str = "",
                     sanitize: bool = False) -> Iterator[SourceItem]:
    """A manifest (`files`, `text`, `meta`, `key`) or, for text, any records with `text_field`."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skip("corrupt", origin, f"not JSON ({e})")
                continue
            if not isinstance(rec, dict):
                skip("corrupt", origin, f"a line must hold a JSON object, got {type(rec).__name__}")
                continue
            files = {str(k).lower().lstrip("."): os.path.join(base, v) for k, v in (rec.get("files") or {}).items()}
            text = rec.get(text_field, rec.get("text"))
            if modality == "text" and not files and not isinstance(text, str):
                skip("no_payload", origin, f"no string field {text_field!r} (--text-field names another)")
                continue
            key = _record_key(rec, f"{key_prefix}line{lineno:07d}")
            if sanitize:
                key = flat_key(f"{key_prefix}{key}" if key_prefix and not key.startswith(key_prefix) else key)
            yield SourceItem(key, files, text if isinstance(text, str) else None, dict(rec.get("meta") or {}), origin)


def items_from_parquet(path: str, text_field: str, skip: Skip, key_prefix: str = "") -> Iterator[SourceItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid: not Parquet, truncated footer
        skip("corrupt", path, f"not a readable Parquet file: {type(e).__name__}: {e}")
        return
    columns = pf.schema_arrow.names
    if text_field not in columns:
        skip("no_payload", path, f"no column {text_field!r} (columns: {', '.join(columns[:20])}; --text-field names another)")
        return
    key_col = next((c for c in ("key", "id") if c in columns), None)
    row = 0
    for batch in pf.iter_batches(columns=[text_field] + ([key_col] if key_col else [])):
        d = batch.to_pydict()
        for i, text in enumerate(d[text_field]):
            row += 1
            origin = f"{path}:row {row}"
            if not isinstance(text, str):
                skip("no_payload", origin, f"column {text_field!r} is {type(text).__name__}, not text")
                continue
            key = str(d[key_col][i]) if key_col and d[key_col][i] is not None else f"row{row:08d}"
            yield SourceItem(flat_key(f"{key_prefix}{key}"), {}, text, {}, origin)


def items_from_folder(src: str, modality: str, text_field: str, skip: Skip) -> Iterator[SourceItem]:
    groups: dict[str, dict[str, str]] = {}
    if os.path.isfile(src):
        stem, ext = os.path.splitext(os.path.basename(src))
        groups[stem] = {ext.lower().lstrip("."): src}
    else:
        for dirpath, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                if name.startswith("."):
                    continue
                stem, ext = os.path.splitext(name)
                rel = os.path.relpath(os.path.join(dirpath, stem), src)
                groups.setdefault(rel, {})[ext.lower().lstrip(".")] = os.path.join(dirpath, name)
    accepted = PAYLOAD_EXTS[modality] + (RECORD_EXTS if modality == "text" else ())
    for rel, files in sorted(groups.items()):
        if modality == "text":
            for ext in RECORD_EXTS:
                if ext in files:
                    path = files.pop(ext)
                    prefix = flat_key(rel) + "__"
                    if ext == "jsonl":
                        yield from items_from_jsonl(path, modality, text_field, skip, prefix, sanitize=True)
                    else:
                        yield from items_from_parquet(path, text_field, skip, prefix)
            if not files:
                continue
        payload = [e for e in PAYLOAD_EXTS[modality] if e in files]
        sidecars = [e for e in SIDECAR_EXTS if e in files and e not in payload]
        for e in sorted(files):
            if e not in payload and e not in sidecars and not (e in COMPANION_EXTS and modality == "shape3d"):
                hint = "; a folder's .tar files are read as shards only when it holds no payload file: " \
                       "give the shards as --src 'DIR/*.tar'" if e == "tar" else ""
                skip("unsupported_extension", files[e], f".{e} is not read for {modality} "
                                                        f"(accepted: .{' .'.join(accepted)}){hint}")
        if not payload:
            if sidecars:
                skip("no_payload", " + ".join(files[e] for e in sidecars),
                     f"no {modality} file (.{' .'.join(accepted)}) beside it")
            continue
        for extra in payload[1:]:
            skip("duplicate_payload", files[extra], f"{files[payload[0]]} has the same name and is used instead")
        meta, text, origin = {}, None, files[payload[0]]
        if "json" in sidecars:
            try:
                with open(files["json"], encoding="utf-8") as f:
                    meta = json.load(f)
                if not isinstance(meta, dict):
                    raise ValueError(f"holds a {type(meta).__name__}, not an object")
            except (OSError, ValueError) as e:
                skip("corrupt", files["json"], f"metadata sidecar unreadable ({e}); {origin} skipped with it")
                continue
        if modality != "text" and "txt" in sidecars:
            with open(files["txt"], encoding="utf-8", errors="replace") as f:
                text = f.read().strip()
        yield SourceItem(flat_key(rel), {payload[0]: files[payload[0]]}, text, meta, origin)


def open_source(src: str, modality: str, text_field: str, field_map: str | None, skip: Skip) -> Iterator[SourceItem]:
    """The items of `src` (see the module docstring for how it is read); ValueError if it is none of those."""
    if is_shard_spec(src, modality):
        return items_from_webdataset(src, modality, parse_field_map(field_map, modality), skip)
    if field_map:
        raise ValueError("--map applies to webdataset sources (shards); --src is not one")
    if os.path.isfile(src) and src.lower().endswith((".jsonl", ".json")):
        return items_from_jsonl(src, modality, text_field, skip)
    if os.path.isfile(src) and src.lower().endswith(".parquet"):
        if modality != "text":
            raise ValueError(f"--src {src!r}: Parquet is read for text only (one document per row)")
        return items_from_parquet(src, text_field, skip)
    if os.path.isdir(src) or os.path.isfile(src):
        return items_from_folder(src, modality, text_field, skip)
    hint = f" (matches: {len(glob.glob(src))})" if any(c in src for c in "*?[") else ""
    raise ValueError(f"--src {src!r} is not a folder, a file, a .jsonl manifest, a .parquet file or a "
                     f"shard spec (brace pattern, glob, pipe: URL, .tar){hint}")
