"""`mmfm data build`: user files (a folder or a JSONL manifest) -> checked tar shards.

Folder: files are grouped by their path without extension; each group is one sample.
    photos/cat.jpg + photos/cat.txt (caption) + photos/cat.json (extra metadata)
A `.json` beside a file is merged into the sample's metadata (fps for video; channel_names,
grid_spacing, time_step, parameters for physics; source, license for anything).

JSONL: one sample per line, paths relative to the manifest's folder:
    {"key": "cat", "files": {"jpg": "photos/cat.jpg"}, "text": "a cat on a mat",
     "meta": {"source": "my camera", "license": "CC-BY-4.0"}}
`text` is the document (text), caption (image, video, 3D), transcript (audio) or description
(physics). Keys from a manifest are used as given, so an unsafe key (`../x`, `/x`) is
rejected by the writer and reported, never written.

Payloads are stored as given where the format is in the schema (a JPEG stays the same bytes);
meshes (.ply/.obj/.stl/.off/.glb) become sampled points with normals plus the mesh itself.
A sample that fails is reported and skipped; the exit status is then 1.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from mmfm.data.codecs import DecodeError, decode_field
from mmfm.data.schema import MODALITIES, SchemaError
from mmfm.data.writer import SampleShardWriter

MESH_EXTS = (".ply", ".obj", ".stl", ".off", ".glb")
PAYLOAD_EXTS = {
    "text": (".txt", ".md"),
    "image": (".png", ".jpg", ".jpeg"),
    "audio": (".wav", ".flac"),
    "video": (".npz",),
    "shape3d": (".npz",) + MESH_EXTS,
    "physics": (".npz",),
}


@dataclass
class SourceItem:
    key: str
    files: dict  # extension without dot -> path
    text: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class BuildSummary:
    written: int = 0
    rejected: list = field(default_factory=list)  # (key, reason)
    manifest: dict = field(default_factory=dict)


def _flat_key(rel_stem: str) -> str:
    """A safe key from a relative path: separators become '__', other odd characters '_'."""
    parts = [re.sub(r"[^A-Za-z0-9_\-]", "_", p) for p in rel_stem.replace(os.sep, "/").split("/") if p]
    return "__".join(parts) or "_"


def items_from_folder(src: str, modality: str) -> list[SourceItem]:
    groups: dict[str, dict[str, str]] = {}
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            rel = os.path.relpath(os.path.join(root, stem), src)
            groups.setdefault(rel, {})[ext.lower().lstrip(".")] = os.path.join(root, name)
    items, keys = [], set()
    for rel, files in sorted(groups.items()):
        payload = [e for e in files if f".{e}" in PAYLOAD_EXTS[modality]]
        if modality == "text" and not payload:
            continue
        if modality != "text" and not payload:
            continue  # a caption or sidecar whose payload is elsewhere (or absent)
        meta = {}
        if "json" in files:
            with open(files.pop("json")) as f:
                meta = json.load(f)
        text = None
        if modality != "text" and "txt" in files:
            with open(files.pop("txt"), encoding="utf-8") as f:
                text = f.read().strip()
        key = _flat_key(rel)
        while key in keys:
            key += "_"
        keys.add(key)
        items.append(SourceItem(key, {e: p for e, p in files.items() if f".{e}" in PAYLOAD_EXTS[modality]}, text, meta))
    return items


def items_from_jsonl(path: str) -> list[SourceItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
            files = {str(k).lower().lstrip("."): os.path.join(base, v) for k, v in (rec.get("files") or {}).items()}
            items.append(SourceItem(str(rec.get("key", f"line{lineno:07d}")), files, rec.get("text"),
                                    dict(rec.get("meta") or {})))
    return items


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _mesh_to_points(path: str, num_points: int, seed: int) -> dict:
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    points, face_idx = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return {"points": points.astype(np.float32), "normals": mesh.face_normals[face_idx].astype(np.float32),
            "vertices": np.asarray(mesh.vertices, np.float32), "faces": np.asarray(mesh.faces, np.int32)}


def sample_from_item(item: SourceItem, modality: str, source: str, license: str, num_points: int = 2048) -> dict:
    """The writer's sample dict for one source item; raises SchemaError/DecodeError/OSError."""
    meta = {"source": source, "license": license, **item.meta, "modality": modality}
    sample = {"__key__": item.key}
    exts = [e for e in item.files if f".{e}" in PAYLOAD_EXTS[modality]]
    if modality == "text":
        if item.text is not None:
            sample["txt"] = item.text
        elif exts:
            sample["txt"] = _read(item.files[exts[0]]).decode("utf-8")
        else:
            raise SchemaError(f"sample {item.key!r}: a text sample needs 'text' or a .txt/.md file")
        meta.setdefault("chars", len(sample["txt"]))
        sample["json"] = meta
        return sample
    if not exts:
        raise SchemaError(f"sample {item.key!r}: no {modality} file among {sorted(item.files) or 'none'} "
                          f"(accepted: {' '.join(PAYLOAD_EXTS[modality])})")
    ext = exts[0]
    path = item.files[ext]
    if modality == "image":
        data = _read(path)
        field_name = "jpg" if ext in ("jpg", "jpeg") else "png"
        arr = decode_field(field_name, data)
        meta.update(height=int(arr.shape[0]), width=int(arr.shape[1]), channels=int(arr.shape[2]) if arr.ndim == 3 else 1)
        sample[field_name] = data
    elif modality == "audio":
        data = _read(path)
        audio, rate = decode_field(ext, data)
        meta.update(sample_rate=int(rate), num_samples=int(audio.shape[0]), channels=int(audio.shape[1]))
        sample[ext] = data
    elif modality == "video":
        arrays = decode_field("npz", _read(path))
        frames = arrays.get("frames")
        if frames is None:
            raise SchemaError(f"sample {item.key!r}: {path} has no array 'frames' (T, H, W, 3)")
        if "fps" not in meta:
            raise SchemaError(f"sample {item.key!r}: json field 'fps' is missing (put it in a .json beside {path})")
        meta.update(num_frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]))
        sample["npz"] = arrays
    elif modality == "shape3d":
        arrays = decode_field("npz", _read(path)) if ext == "npz" else _mesh_to_points(path, num_points, seed=0)
        if "points" not in arrays:
            raise SchemaError(f"sample {item.key!r}: {path} has no array 'points' (N, 3)")
        meta.update(num_points=int(len(arrays["points"])), has_faces="faces" in arrays)
        sample["npz"] = arrays
    elif modality == "physics":
        arrays = decode_field("npz", _read(path))
        if "fields" not in arrays:
            raise SchemaError(f"sample {item.key!r}: {path} has no array 'fields' (T, C, *grid)")
        sample["npz"] = arrays
    if item.text:
        sample["txt"] = item.text
    sample["json"] = meta
    return sample


def build_shards(modality: str, src: str, out: str, shard_size: int = 1000, source: str | None = None,
                 license: str = "unknown", prefix: str | None = None, progress: bool = True) -> BuildSummary:
    from tqdm import tqdm

    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if os.path.isdir(src):
        items = items_from_folder(src, modality)
    elif os.path.isfile(src) and src.endswith((".jsonl", ".json")):
        items = items_from_jsonl(src)
    else:
        raise ValueError(f"--src {src!r} is neither a folder nor a .jsonl manifest")
    summary = BuildSummary()
    with SampleShardWriter(out, prefix=prefix or modality, shard_size=shard_size) as writer:
        for item in tqdm(items, desc=f"build {modality}", unit="sample", file=sys.stderr, disable=not progress):
            try:
                writer.write(sample_from_item(item, modality, source or os.path.abspath(src), license))
                summary.written += 1
            except (SchemaError, DecodeError, OSError, ValueError) as e:
                summary.rejected.append((item.key, str(e)))
                print(f"mmfm data build: skipped {item.key!r}: {e}", file=sys.stderr)
    summary.manifest = writer.manifest
    return summary


def main(args) -> int:
    try:
        summary = build_shards(args.modality, args.src, args.out, args.shard_size, args.source, args.license,
                               args.prefix, progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"mmfm data build: {e}", file=sys.stderr)
        return 2
    m = summary.manifest
    print(f"wrote {summary.written} {args.modality} samples in {len(m['shards'])} shards "
          f"({m['bytes'] / 1e6:.2f} MB) to {args.out}")
    if summary.rejected:
        print(f"skipped {len(summary.rejected)} sample(s):")
        for key, reason in summary.rejected:
            print(f"  {key}: {reason}")
        return 1
    return 0
