"""Decode throughput of each input format: mmfm's decoder against the plain library call on the
same files (`mmfm bench data --formats ...`; the records have `case.format`).

    format  mmfm                                     library (impl name)
    mp4     VideoClip + sample_frames (8 frames)     PyAV: open, decode the first 8 frames to RGB (pyav)
    flac    decode_field("flac")                     soundfile.read (soundfile)
    mp3     decode_field("mp3")                      PyAV: decode every frame (pyav)
    hdf5    iter_trajectories (every trajectory)     h5py: read each trajectory's slice (h5py)
    glb     data build's mesh -> 2048 points         trimesh.load + sample_surface (trimesh)
    webp    decode_image (normalised)                Pillow: open + convert("RGB") (pillow)
The difference is what mmfm adds: probing and frame counting (video), the checks, normalisation.
"""
from __future__ import annotations

import io
import os
import time

import numpy as np

FORMATS = ("mp4", "flac", "mp3", "hdf5", "glb", "webp")


def _files(fmt: str, n: int, folder: str) -> list:
    """n inputs of `fmt` (bytes, or paths for hdf5), written by the library people write them with."""
    import av
    import soundfile

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if fmt == "mp4":
            from mmfm.data.video import encode_mp4

            t = np.arange(48)[:, None, None, None]
            out.append(encode_mp4(((t * 5 + i + np.zeros((48, 64, 64, 3))) % 256).astype(np.uint8), 24))
        elif fmt == "flac":
            buf = io.BytesIO()
            soundfile.write(buf, rng.uniform(-0.5, 0.5, (44100, 2)).astype(np.float32), 44100, format="FLAC")
            out.append(buf.getvalue())
        elif fmt == "mp3":
            buf = io.BytesIO()
            with av.open(buf, mode="w", format="mp3") as c:
                s = c.add_stream("libmp3lame", rate=22050)
                s.layout = "mono"
                fr = av.AudioFrame.from_ndarray(rng.uniform(-0.5, 0.5, (1, 22050)).astype(np.float32), format="fltp",
                                                layout="mono")
                fr.sample_rate = 22050
                for p in list(s.encode(fr)) + list(s.encode(None)):
                    c.mux(p)
            out.append(buf.getvalue())
        elif fmt == "hdf5":
            from mmfm.data.hdf5 import write_pdebench

            path = os.path.join(folder, f"f{i}.h5")
            write_pdebench(path, rng.normal(size=(8, 16, 1, 32, 32)).astype(np.float32), ["u"], [1 / 32, 1 / 32], 0.1)
            out.append(path)
        elif fmt == "glb":
            import trimesh

            out.append(trimesh.creation.icosphere(subdivisions=3).export(file_type="glb"))
        elif fmt == "webp":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="WEBP")
            out.append(buf.getvalue())
    return out


def _mmfm(fmt: str):
    from mmfm.data.codecs import decode_field

    if fmt == "mp4":
        from mmfm.data.video import VideoClip, sample_frames

        return lambda d: sample_frames(VideoClip(d), 8)
    if fmt in ("flac", "mp3"):
        return lambda d: decode_field(fmt, d)
    if fmt == "hdf5":
        from mmfm.data.hdf5 import iter_trajectories

        return lambda p: [f for f, _ in iter_trajectories(p)]
    if fmt == "glb":
        from mmfm.data.build import _mesh_arrays
        from mmfm.data.sources import SourceItem

        return lambda d: _mesh_arrays(SourceItem("k", {"glb": d}, origin="bench"), "glb", 2048)
    from mmfm.data.images import decode_image

    return decode_image


def _library(fmt: str):
    import av

    if fmt == "mp4":
        def run(d):
            with av.open(io.BytesIO(d)) as c:
                out = []
                for f in c.decode(video=0):
                    out.append(f.to_ndarray(format="rgb24"))
                    if len(out) == 8:
                        return out
        return "pyav", run
    if fmt == "flac":
        import soundfile

        return "soundfile", lambda d: soundfile.read(io.BytesIO(d), dtype="float32")
    if fmt == "mp3":
        def run(d):
            with av.open(io.BytesIO(d)) as c:
                return [f.to_ndarray() for f in c.decode(audio=0)]
        return "pyav", run
    if fmt == "hdf5":
        import h5py

        def run(p):
            with h5py.File(p, "r") as f:
                ds = f["u"]      # looked up once, as a careful user writes it
                return [ds[i] for i in range(ds.shape[0])]
        return "h5py", run
    if fmt == "glb":
        import trimesh

        def run(d):
            m = trimesh.load(io.BytesIO(d), file_type="glb", force="mesh")
            return trimesh.sample.sample_surface(m, 2048, seed=0)
        return "trimesh", run
    from PIL import Image

    def run(d):
        with Image.open(io.BytesIO(d)) as im:
            return np.asarray(im.convert("RGB"))
    return "pillow", run


def format_records(formats, n: int, repeats: int, folder: str) -> list:
    from mmfm.bench.common import record

    records = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"--formats: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        files = _files(fmt, n, folder)
        size = sum(os.path.getsize(f) if isinstance(f, str) else len(f) for f in files)
        case = {"format": fmt, "files": n, "kb_per_file": round(size / n / 1e3, 1)}
        lib_name, lib = _library(fmt)
        impls = (("mmfm", _mmfm(fmt)), (lib_name, lib))
        times = {impl: [] for impl, _ in impls}
        for _ in range(repeats):     # interleaved in rounds, so a change of machine load hits both sides alike
            for impl, fn in impls:
                t0 = time.perf_counter()
                for f in files:
                    fn(f)
                times[impl].append(time.perf_counter() - t0)
        for impl, _ in impls:
            t = sorted(times[impl])[len(times[impl]) // 2]
            records.append(record("data", case, impl, files_per_s=round(n / t, 1), mb_per_s=round(size / 1e6 / t, 2),
                                  ms=round(t * 1e3, 1)))
    return records
