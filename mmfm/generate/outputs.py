"""Writers and readers for generated samples. The extension of `--out` picks the format; without
one the first (the default) is used:

    text      .txt               UTF-8
    image     .png               [3, H, W] float in [0, 1]
    video     .mp4 | .gif        [T, 3, H, W] float in [0, 1]; MP4 through PyAV (H.264 where the bundled
                                 FFmpeg has it, else MPEG-4 Part 2) at the tokenizer's fps (8 when it has none)
    audio     .wav | .flac       [N] float in [-1, 1] at the tokenizer's sample rate (16-bit PCM; FLAC via soundfile)
    shape3d   .ply | .obj | .glb [N, 3] float points (ASCII PLY; OBJ and GLB via trimesh)
                                 + a .png rendering (x-y projection, depth-shaded)
    physics   .npz | .h5         {"fields": [T, C, G, G] float}; .h5 in the PDEBench layout (h5py,
                                 mmfm.data.hdf5.write_pdebench) + a .png rendering (a row of frames, channel 0)

`write_output` returns every path it wrote; `read_output` reads the main file back to the value
(`read_input` does the same for prompt inputs, from the same formats). The readers are the
round-trip check of the writers and the way `mmfm generate --image IN.png ...` reads its inputs.
"""
from __future__ import annotations

import os

import numpy as np
import torch

FORMATS = {"text": (".txt",), "image": (".png",), "video": (".mp4", ".gif"), "audio": (".wav", ".flac"),
           "shape3d": (".ply", ".obj", ".glb"), "physics": (".npz", ".h5", ".hdf5")}
EXTENSIONS = {m: f[0] for m, f in FORMATS.items()}  # the default of each modality
READABLE = {"text": (".txt",), "image": (".png", ".jpg", ".jpeg", ".webp"), "video": (".mp4", ".webm", ".mkv", ".mov", ".gif", ".npz"),
            "audio": (".wav", ".flac", ".ogg", ".mp3", ".m4a"), "shape3d": (".ply", ".obj", ".glb", ".stl", ".off", ".npz"),
            "physics": (".npz", ".h5", ".hdf5")}
DEFAULT_FPS = 8.0


def output_path(out: str, modality: str, index: int | None = None) -> str:
    """`out` with one of the modality's extensions (the default added when there is none; one the
    modality has no writer for is an error), and `-<index>` before it for batch rows."""
    if modality not in FORMATS:
        raise ValueError(f"no output format for modality {modality!r}; known: {sorted(FORMATS)}")
    stem, given = os.path.splitext(out)
    if given and given.lower() not in FORMATS[modality]:
        raise ValueError(f"--out {out!r}: a {modality} sample is written as {' or '.join(FORMATS[modality])}, not {given}")
    ext = given.lower() if given else EXTENSIONS[modality]
    if not given:
        stem = out
    return f"{stem}{'' if index is None else f'-{index}'}{ext}"


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    from mmfm.tokenizers.render import to_uint8

    return to_uint8(img)


def write_output(path: str, modality: str, value, sample_rate: int | None = None, fps: float | None = None) -> list[str]:
    """Write one decoded sample in the format of `path`'s extension; returns the paths written (main file first)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if modality in FORMATS and ext not in FORMATS[modality]:
        raise ValueError(f"write_output: {path}: a {modality} sample is written as {' or '.join(FORMATS[modality])}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if modality == "text":
        with open(path, "w", encoding="utf-8") as f:
            f.write(value)
        return [path]
    x = torch.as_tensor(value).detach().float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"write_output: the decoded {modality} sample has NaN or infinite values")
    if modality == "image":
        _shape(x, 3, "image", "[3, H, W]")
        Image.fromarray(_to_uint8(x)).save(path)
        return [path]
    if modality == "video":
        _shape(x, 4, "video", "[T, 3, H, W]")
        rate = float(fps or DEFAULT_FPS)
        if ext == ".mp4":
            from mmfm.data.video import encode_mp4

            data = encode_mp4(np.stack([_to_uint8(f) for f in x]), rate)
            with open(path, "wb") as f:
                f.write(data)
            return [path]
        frames = [Image.fromarray(_to_uint8(f)) for f in x]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / rate), loop=0)
        return [path]
    if modality == "audio":
        _shape(x, 1, "audio", "[N]")
        if not sample_rate:
            raise ValueError("write_output: argument 'sample_rate' is needed for audio")
        from mmfm.data.audio import encode_flac
        from mmfm.data.codecs import encode_wav

        encode = encode_flac if ext == ".flac" else encode_wav
        with open(path, "wb") as f:
            f.write(encode(x.clamp(-1, 1).numpy(), sample_rate))
        return [path]
    if modality == "shape3d":
        _shape(x, 2, "shape3d", "[N, 3]")
        if ext == ".ply":
            write_ply(path, x[:, :3].numpy())
        else:
            import trimesh

            trimesh.PointCloud(x[:, :3].numpy()).export(path, file_type=ext[1:])
        from mmfm.tokenizers.shape3d import render_points

        png = os.path.splitext(path)[0] + ".png"
        Image.fromarray(_to_uint8(_upscale(render_points(x[:, :3], 128)))).save(png)
        return [path, png]
    if modality == "physics":
        _shape(x, 4, "physics", "[T, C, G, G]")
        if ext == ".npz":
            np.savez(path, fields=x.numpy())
        else:
            from mmfm.data.hdf5 import write_pdebench

            # one trajectory on the unit square; the channels have no names beyond their order
            write_pdebench(path, x.numpy()[None], [f"u{c}" for c in range(x.shape[1])],
                           [1.0 / n for n in x.shape[2:]], 1.0)
        png = os.path.splitext(path)[0] + ".png"
        Image.fromarray(_to_uint8(_upscale(render_fields(x)))).save(png)
        return [path, png]
    raise ValueError(f"write_output: no output format for modality {modality!r}; known: {sorted(EXTENSIONS)}")


def _shape(x: torch.Tensor, dims: int, modality: str, want: str) -> None:
    if x.dim() != dims or (modality in ("image", "video") and x.shape[-3] != 3) or \
            (modality == "shape3d" and x.shape[1] < 3):
        raise ValueError(f"write_output: a decoded {modality} sample must be {want}, got {tuple(x.shape)}")


def _upscale(img: torch.Tensor, min_size: int = 256) -> torch.Tensor:
    """Nearest-neighbour upscale of a small [C, H, W] render so it is viewable."""
    k = max(1, min_size // max(img.shape[-2:]))
    return img.repeat_interleave(k, -2).repeat_interleave(k, -1) if k > 1 else img


def render_fields(x: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """[T, C, G, G] fields -> a grey [1, G, n*G] row of (up to max_frames, evenly spaced) frames of
    channel 0, on one colour scale."""
    from mmfm.tokenizers.render import normalise

    idx = torch.linspace(0, x.shape[0] - 1, min(max_frames, x.shape[0])).round().long()
    f = normalise(x[idx, 0])
    return torch.cat(list(f), 1)[None]


def write_ply(path: str, points: np.ndarray) -> None:
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    with open(path, "w") as f:
        f.write(f"ply\nformat ascii 1.0\nelement vertex {len(pts)}\n"
                "property float x\nproperty float y\nproperty float z\nend_header\n")
        np.savetxt(f, pts, fmt="%.6g")


def read_ply(path: str) -> np.ndarray:
    """Points [N, 3] of an ASCII PLY (x y z the first three vertex properties)."""
    with open(path) as f:
        if f.readline().strip() != "ply":
            raise ValueError(f"{path}: not a PLY file (first line must be 'ply')")
        n, fmt = None, None
        for line in f:
            parts = line.split()
            if parts[:1] == ["format"]:
                fmt = parts[1]
            elif parts[:2] == ["element", "vertex"]:
                n = int(parts[2])
            elif parts[:1] == ["end_header"]:
                break
        if fmt != "ascii" or n is None:
            raise ValueError(f"{path}: only ASCII PLY with an 'element vertex' is read (format {fmt}, vertices {n})")
        rows = [f.readline().split()[:3] for _ in range(n)]
    pts = np.asarray(rows, dtype=np.float32).reshape(n, 3)
    return pts


def read_output(path: str, modality: str):
    """The value written by write_output: str, or a float tensor (image [3, H, W], video
    [T, 3, H, W], audio ([N], sample_rate), shape3d [N, 3], physics [T, C, G, G])."""
    from PIL import Image, ImageSequence

    from mmfm.data.images import decode_image

    ext = os.path.splitext(path)[1].lower()
    if modality not in READABLE:
        raise ValueError(f"no reader for modality {modality!r}; known: {sorted(READABLE)}")
    if ext not in READABLE[modality]:
        raise ValueError(f"{path}: a {modality} input must be one of {', '.join(READABLE[modality])}, not {ext or 'no extension'}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if modality == "text":
        with open(path, encoding="utf-8") as f:
            return f.read()
    if modality == "image":
        with open(path, "rb") as f:
            arr = decode_image(f.read())[0]
        return image_to_float(arr)
    if modality == "video" and ext == ".gif":
        with Image.open(path) as im:
            return torch.stack([_from_uint8(np.asarray(f.convert("RGB"))) for f in ImageSequence.Iterator(im)])
    if modality == "video" and ext != ".npz":
        from mmfm.data.video import VideoClip, frames_of

        with open(path, "rb") as f:
            clip = VideoClip(f.read())
        return torch.stack([_from_uint8(a) for a in frames_of({ext[1:]: clip})])
    if modality == "audio":
        from mmfm.data.codecs import decode_field

        with open(path, "rb") as f:
            wav, rate = decode_field(ext[1:], f.read())
        return torch.from_numpy(wav.mean(1)), rate
    if modality == "shape3d" and ext == ".ply":
        try:
            return torch.from_numpy(read_ply(path))
        except ValueError:
            pass  # a binary PLY (another tool's): trimesh below
    if modality == "shape3d" and ext != ".npz":
        import trimesh

        geom = trimesh.load(path, process=False)
        if isinstance(geom, trimesh.Scene):
            geom = trimesh.PointCloud(np.concatenate([g.vertices for g in geom.dump()]))
        return torch.from_numpy(np.asarray(geom.vertices, dtype=np.float32))
    if modality == "physics" and ext in (".h5", ".hdf5"):
        from mmfm.data.hdf5 import iter_trajectories

        fields, _ = next(iter_trajectories(path))
        return torch.from_numpy(fields)
    key = {"video": "frames", "shape3d": "points", "physics": "fields"}[modality]
    with np.load(path, allow_pickle=False) as z:
        if key not in z:
            raise ValueError(f"{path}: a {modality} .npz needs an array named '{key}', found {list(z.keys())}")
        return torch.from_numpy(np.array(z[key], dtype=np.float32))


def image_to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> float [3, H, W]; grey repeated, alpha over white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        a = arr[:, :, 3:].astype(np.float32) / 255.0
        arr = np.round(arr[:, :, :3] * a + 255.0 * (1 - a)).astype(np.uint8)
    return _from_uint8(arr)


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float() / 255.0


def read_input(path: str, modality: str):
    """A prompt input file -> what the modality's tokenizer `encode` takes."""
    value = read_output(path, modality)
    if modality == "audio":
        wav, rate = value
        return {"wav": (wav.numpy(), rate)}
    return value
