"""`mmfm data build`: user files, manifests or existing webdatasets -> checked tar shards.

Sources (mmfm/data/sources.py says how `--src` is read): a folder (files grouped by path without
extension: photos/cat.jpg + photos/cat.txt caption + photos/cat.json extra metadata), a JSONL
manifest, a Parquet file (text), or webdataset shards written by other tools (img2dataset,
video2dataset, audio webdatasets), with `--map` naming their fields.
A `.json` beside a file is merged into the sample's metadata (channel_names, grid_spacing,
time_step, parameters for a physics .npz; source, license for anything).

Each input is decoded by the library made for it, to check it and to fill the metadata:
  image    Pillow; a plain 8-bit JPEG or PNG is stored as given, anything else (WebP, GIF, 16-bit,
           palette, CMYK, EXIF-rotated) as the normalised PNG (mmfm/data/images.py)
  audio    soundfile (WAV, FLAC, OGG) or PyAV (MP3, M4A, AAC, Opus); stored as given
  video    PyAV (MP4, WebM, MKV, MOV): probed, every packet demuxed, the first frame decoded;
           stored as the original encoded bytes (mmfm/data/video.py)
  shape3d  trimesh (OBJ, GLB, GLTF, STL, PLY, OFF): num_points surface samples with face normals,
           plus vertices and faces; a point cloud keeps (a subset of) its points
  physics  h5py: one sample per trajectory of a PDEBench or The Well file (mmfm/data/hdf5.py); .npz
  text     .txt/.md (one document a file), JSONL and Parquet (one a record, --text-field)

Nothing is skipped in silence: every file not turned into a sample is reported with a reason
(REASONS) and counted; the report is printed and written to `<out>/<prefix>-build-report.json`.
Inputs that fail to decode make the exit status 1; files that are not inputs of this modality
(an unsupported extension, a caption without its image) are listed but do not. When more than
--max-bad-fraction of the inputs seen (after --min-inputs) fail, or on SIGINT/SIGTERM, the run
stops after the current sample and the shards written so far are published, none lost.
"""
from __future__ import annotations

import io
import itertools
import os
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mmfm.data.codecs import DecodeError, decode_field
from mmfm.data.schema import MODALITIES, SchemaError
from mmfm.data.sources import SourceItem, open_source
from mmfm.data.writer import SampleShardWriter
from mmfm.jsonio import write_json

# reason -> whether it counts as a failed input (exit status 1, threshold) or only as a file not used
REASONS = {
    "corrupt": True,                # the bytes do not decode (truncated, not the format its name says)
    "too_short": True,              # decodes, but holds nothing (0 audio samples, no frames, no points)
    "wrong_shape": True,            # decodes, but its arrays have a shape the schema cannot take
    "invalid": True,                # breaks the schema otherwise (an unsafe key, bad metadata)
    "unreadable": True,             # the file system refused it
    "corrupt_shard": True,          # a source shard that cannot be opened or is cut short
    "unsupported_extension": False,  # not an input format of this modality
    "no_payload": False,            # a caption or metadata file without its payload
    "duplicate_payload": False,     # two payloads with one name: the first is used
    "unused_field": False,          # a webdataset field no role maps
}
MAX_LISTED = 50  # problems printed; the report file has them all


class TooShort(SchemaError):
    """An input that decodes but holds nothing to train on."""


class WrongShape(SchemaError):
    """An input whose arrays the schema cannot take."""


def reason_of(e: BaseException) -> str:
    from mmfm.data.audio import AudioError
    from mmfm.data.hdf5 import HDF5LayoutError
    from mmfm.data.images import ImageError
    from mmfm.data.video import VideoError, VideoTooShort

    if isinstance(e, (TooShort, VideoTooShort)):
        return "too_short"
    if isinstance(e, (WrongShape, HDF5LayoutError)):
        return "wrong_shape"
    if isinstance(e, (DecodeError, VideoError, AudioError, ImageError)):
        return "corrupt"
    if isinstance(e, SchemaError):
        return "invalid"
    if isinstance(e, OSError):
        return "unreadable"
    return "corrupt"  # a decoder library's own exception type


@dataclass
class BuildOptions:
    shard_size: int = 1000
    source: str | None = None
    license: str = "unknown"
    prefix: str | None = None
    num_points: int = 2048
    text_field: str = "text"
    field_map: str | None = None
    max_bad_fraction: float = 0.5
    min_inputs: int = 20
    progress: bool = True


@dataclass
class BuildSummary:
    written: int = 0
    inputs: int = 0      # payload inputs tried (a file, a record, a trajectory)
    failed: int = 0      # of those, how many failed
    problems: list = field(default_factory=list)  # {"reason", "name", "detail"}
    counts: Counter = field(default_factory=Counter)
    stopped: str = ""    # why the run stopped early ("" when it did not)
    manifest: dict = field(default_factory=dict)

    @property
    def rejected(self) -> list:
        """(name, detail) of every failed input: what the exit status counts."""
        return [(p["name"], p["detail"]) for p in self.problems if REASONS.get(p["reason"], True)]

    def add(self, reason: str, name: str, detail: str) -> None:
        self.counts[reason] += 1
        self.problems.append({"reason": reason, "name": name, "detail": detail})
        if REASONS.get(reason, True):
            self.failed += 1


# -- per modality: an item -> writer samples --------------------------------------------------
def _mesh_arrays(item: SourceItem, ext: str, num_points: int, seed: int = 0) -> dict:
    import trimesh

    path = item.files[ext]
    if isinstance(path, str):
        geom = trimesh.load(path, process=False)  # a path: a .gltf finds its .bin, an .obj its .mtl
    else:
        geom = trimesh.load(io.BytesIO(path), file_type=ext, process=False)
    if isinstance(geom, trimesh.Scene):
        parts = list(geom.dump())  # every geometry with its scene transform applied
        meshes = [g for g in parts if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        clouds = [g for g in parts if isinstance(g, trimesh.PointCloud)]
        if meshes:
            geom = trimesh.util.concatenate(meshes)
        elif clouds:
            geom = trimesh.PointCloud(np.concatenate([c.vertices for c in clouds]))
        else:
            raise TooShort(f"{item.origin}: the scene holds no mesh with faces and no point cloud")
    if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
        if not geom.area > 0:
            raise TooShort(f"{item.origin}: the mesh's {len(geom.faces)} faces have zero area")
        points, face_idx = trimesh.sample.sample_surface(geom, num_points, seed=seed)
        return {"points": points.astype(np.float32), "normals": geom.face_normals[face_idx].astype(np.float32),
                "vertices": np.asarray(geom.vertices, np.float32), "faces": np.asarray(geom.faces, np.int32)}
    pts = np.asarray(getattr(geom, "vertices", np.zeros((0, 3))), np.float32)
    if pts.ndim != 2 or pts.shape[0] == 0:
        raise TooShort(f"{item.origin}: no faces and no points")
    if pts.shape[0] > num_points:  # a point cloud: an evenly spread subset, no surface to sample
        pts = pts[np.random.default_rng(seed).choice(pts.shape[0], num_points, replace=False)]
    return {"points": pts}


def _image(item: SourceItem, ext: str, sample: dict, meta: dict) -> None:
    from mmfm.data.images import decode_image

    data = item.read(ext)
    arr, info = decode_image(data)
    meta.update(height=int(arr.shape[0]), width=int(arr.shape[1]), channels=int(arr.shape[2]) if arr.ndim == 3 else 1,
                original_format=(info["format"] or ext).lower())
    if info["exif_transposed"]:
        meta["exif_transposed"] = True
    if info["needs_reencode"]:
        sample["png"] = arr  # normalised: the writer stores it as PNG
    else:
        sample["jpg" if info["format"] == "JPEG" else "png"] = data


def _audio(item: SourceItem, ext: str, sample: dict, meta: dict) -> None:
    data = item.read(ext)
    audio, rate = decode_field(ext, data)
    if audio.shape[0] == 0:
        raise TooShort(f"{item.origin}: decodes to 0 audio samples")
    meta.update(sample_rate=int(rate), num_samples=int(audio.shape[0]), channels=int(audio.shape[1]))
    sample[ext] = data


def _video(item: SourceItem, ext: str, sample: dict, meta: dict) -> None:
    from mmfm.data.video import VideoClip, sample_frames

    if ext == "npz":
        arrays = decode_field("npz", item.read(ext))
        frames = arrays.get("frames")
        if frames is None:
            raise WrongShape(f"{item.origin}: no array 'frames' (T, H, W, 3)")
        if "fps" not in meta:
            raise SchemaError(f"{item.origin}: json field 'fps' is missing (put it in a .json beside the file)")
        meta.update(num_frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]))
        sample["npz"] = arrays
        return
    data = item.read(ext)
    clip = VideoClip(data)
    sample_frames(clip, 1)  # the codec decodes: probing alone would pass a stream the decoder refuses
    meta.update(fps=round(clip.fps, 6), num_frames=clip.num_frames, width=clip.width, height=clip.height,
                codec=clip.codec, duration=round(clip.duration, 6))
    sample[ext] = data


def _physics(item: SourceItem, ext: str, base: dict):
    from mmfm.data.hdf5 import iter_trajectories

    if ext == "npz":
        arrays = decode_field("npz", item.read(ext))
        if "fields" not in arrays:
            raise WrongShape(f"{item.origin}: no array 'fields' (T, C, *grid)")
        yield item.key, {"npz": arrays}, {}
        return
    src = item.files[ext]
    trajs = iter_trajectories(src if isinstance(src, str) else io.BytesIO(src))
    first = next(trajs, None)
    if first is None:
        raise TooShort(f"{item.origin}: the file holds no trajectory")
    second = next(trajs, None)
    if second is None:  # one trajectory: the sample keeps the file's key
        fields, meta = first
        yield item.key, {"npz": {"fields": fields}}, _traj_meta(meta, fields, 0)
        return
    for i, (fields, meta) in enumerate(itertools.chain([first, second], trajs)):
        yield f"{item.key}__{i:06d}", {"npz": {"fields": fields}}, _traj_meta(meta, fields, i)


def _traj_meta(meta: dict, fields: np.ndarray, i: int) -> dict:
    return {**meta, "trajectory": i, "num_frames": int(fields.shape[0]), "grid_shape": list(fields.shape[2:])}


# what describes an HDF5 file's arrays comes from the file, whatever a sidecar .json says: the data is in its order
HDF5_STRUCTURE = ("channel_names", "grid_spacing", "time_step", "num_frames", "grid_shape", "trajectory", "layout")


def samples_from_item(item: SourceItem, modality: str, opts: BuildOptions):
    """Writer samples (usually one; an HDF5 file gives one per trajectory) for one source item.
    Raises (SchemaError, DecodeError, OSError, a decoder's own error) for an input that fails."""
    base = {"source": opts.source or item.origin, "license": opts.license}
    meta = {**base, **item.meta, "modality": modality}
    sample = {"__key__": item.key}
    ext = item.payload(modality)
    if modality == "text":
        if item.text is not None:
            sample["txt"] = item.text
        elif ext:
            sample["txt"] = item.read(ext).decode("utf-8")
        else:
            raise SchemaError(f"sample {item.key!r}: a text sample needs 'text' or a .txt/.md file")
        if not sample["txt"].strip():
            raise TooShort(f"{item.origin}: the text is empty")
        meta.setdefault("chars", len(sample["txt"]))
        sample["json"] = meta
        yield sample
        return
    if ext is None:
        from mmfm.data.sources import PAYLOAD_EXTS

        raise SchemaError(f"sample {item.key!r}: no {modality} file among {sorted(item.files) or 'none'} "
                          f"(accepted: .{' .'.join(PAYLOAD_EXTS[modality])})")
    if modality == "physics":
        for key, fields, traj_meta in _physics(item, ext, base):
            structure = {k: traj_meta[k] for k in HDF5_STRUCTURE if k in traj_meta}
            params = {**traj_meta.get("parameters", {}), **meta.get("parameters", {})}
            s = {"__key__": key, **fields, "json": {**traj_meta, **meta, **structure, "parameters": params,
                                                    "modality": "physics"}}
            if item.text:
                s["txt"] = item.text
            yield s
        return
    if modality == "image":
        _image(item, ext, sample, meta)
    elif modality == "audio":
        _audio(item, ext, sample, meta)
    elif modality == "video":
        _video(item, ext, sample, meta)
    elif modality == "shape3d":
        arrays = decode_field("npz", item.read(ext)) if ext == "npz" else _mesh_arrays(item, ext, opts.num_points)
        if "points" not in arrays:
            raise WrongShape(f"{item.origin}: no array 'points' (N, 3)")
        if np.asarray(arrays["points"]).ndim != 2 or np.asarray(arrays["points"]).shape[1:] != (3,):
            raise WrongShape(f"{item.origin}: points have shape {np.asarray(arrays['points']).shape}; expected (N, 3)")
        meta.update(num_points=int(len(arrays["points"])), has_faces="faces" in arrays)
        sample["npz"] = arrays
    if item.text:
        sample["txt"] = item.text
    sample["json"] = meta
    yield sample


# -- the run ----------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between samples, so the shard being written is
    closed and published rather than discarded half-way."""

    def __init__(self):
        self.signal = ""
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_shards(modality: str, src: str, out: str, shard_size: int = 1000, source: str | None = None,
                 license: str = "unknown", prefix: str | None = None, progress: bool = True,
                 options: BuildOptions | None = None) -> BuildSummary:
    from tqdm import tqdm

    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    opts = options or BuildOptions(shard_size, source, license, prefix, progress=progress)
    if not 0 < opts.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in (0, 1], got {opts.max_bad_fraction}")
    summary = BuildSummary()
    items = open_source(src, modality, opts.text_field, opts.field_map, summary.add)
    keys: set[str] = set()
    prefix = opts.prefix or modality
    bar = tqdm(desc=f"build {modality}", unit="sample", file=sys.stderr, disable=not opts.progress)
    with _StopFlag() as stop, SampleShardWriter(out, prefix=prefix, shard_size=opts.shard_size) as writer:
        it = iter(items)
        while not stop.signal and not summary.stopped:
            try:
                item = next(it)
            except StopIteration:
                break
            summary.inputs += 1
            try:
                for sample in samples_from_item(item, modality, opts):
                    key = sample["__key__"]
                    while key in keys:  # two sources' keys that flatten alike
                        key += "_"
                    sample["__key__"] = key
                    try:
                        writer.write(sample)
                    except Exception as e:  # one bad trajectory of a file does not take the others with it
                        summary.add(reason_of(e), f"{item.origin} ({key})", f"{type(e).__name__}: {e}")
                        continue
                    keys.add(key)
                    summary.written += 1
                    bar.update(1)
                    if stop.signal:
                        break
            except Exception as e:  # every decoder library has its own exception types for bad input
                summary.add(reason_of(e), item.origin, f"{type(e).__name__}: {e}")
            if summary.inputs >= opts.min_inputs and summary.failed > opts.max_bad_fraction * summary.inputs:
                summary.stopped = (f"{summary.failed} of {summary.inputs} inputs failed "
                                   f"(> --max-bad-fraction {opts.max_bad_fraction:g})")
        if stop.signal:
            summary.stopped = f"{stop.signal} received"
    bar.close()
    summary.manifest = writer.manifest
    write_json(os.path.join(out, f"{prefix}-build-report.json"),
               {"modality": modality, "src": src, "written": summary.written, "inputs": summary.inputs,
                "failed": summary.failed, "counts": dict(summary.counts), "stopped": summary.stopped,
                "problems": summary.problems, "shards": summary.manifest.get("shards", [])})
    return summary


def _why_nothing(summary: BuildSummary, modality: str, src: str) -> str:
    from mmfm.data.sources import PAYLOAD_EXTS

    if summary.counts:
        top = ", ".join(f"{r} {n}" for r, n in summary.counts.most_common())
        return f"every input was skipped ({top}); the reasons are listed below"
    return f"{src} holds no {modality} input (accepted: .{' .'.join(PAYLOAD_EXTS[modality])})"


def main(args) -> int:
    opts = BuildOptions(shard_size=args.shard_size, source=args.source, license=args.license, prefix=args.prefix,
                        num_points=getattr(args, "num_points", 2048), text_field=getattr(args, "text_field", "text"),
                        field_map=getattr(args, "map", None),
                        max_bad_fraction=getattr(args, "max_bad_fraction", 0.5),
                        min_inputs=getattr(args, "min_inputs", 20), progress=not args.quiet)
    try:
        summary = build_shards(args.modality, args.src, args.out, options=opts)
    except (ValueError, OSError) as e:
        print(f"mmfm data build: {e}", file=sys.stderr)
        return 2
    m = summary.manifest
    print(f"wrote {summary.written} {args.modality} samples in {len(m['shards'])} shards "
          f"({m['bytes'] / 1e6:.2f} MB) to {args.out}")
    if summary.written == 0:
        print(f"nothing written: {_why_nothing(summary, args.modality, args.src)}")
    if summary.problems:
        counts = ", ".join(f"{r} {n}" for r, n in sorted(summary.counts.items()))
        print(f"skipped {len(summary.problems)} input(s) or file(s): {counts}")
        for p in summary.problems[:MAX_LISTED]:
            print(f"  {p['reason']:<21} {p['name']}: {p['detail']}")
        if len(summary.problems) > MAX_LISTED:
            print(f"  ... {len(summary.problems) - MAX_LISTED} more in "
                  f"{os.path.join(args.out, (args.prefix or args.modality) + '-build-report.json')}")
    if summary.stopped:
        print(f"stopped early: {summary.stopped}; the {summary.written} samples written are in complete shards")
    return 1 if summary.rejected or summary.written == 0 or summary.stopped else 0
