"""Bytes <-> values for each field extension, and the per-modality checks on decoded values.

encode_field / decode_field are the only places that map field names to decoders:
  txt   str (UTF-8)                  json  dict
  png   uint8 array (H, W[, C])       jpg   uint8 array (H, W[, C]) (lossy: written at quality 95)
  jpeg, webp: decoded as png/jpg (Pillow, normalised by mmfm.data.images: EXIF orientation, 8 bits)
  wav   float32 array (N, channels) in [-1, 1], stored as 16-bit PCM; the rate is in the .json
  flac, ogg: as wav, through soundfile; mp3, m4a, aac, opus: as wav, through PyAV (mmfm.data.audio)
  mp4, webm, mkv, mov: a VideoClip (mmfm.data.video): the bytes, probed; frames are decoded on demand
  npy   one array                     npz   dict of arrays (never pickled objects)
  ply   dict with `points` (N, 3), optional `normals`, `faces`, through trimesh
Decoding never unpickles (numpy `allow_pickle=False`): a shard is untrusted input.

check_sample raises SchemaError for what decodes but is wrong: NaN or infinite values, a shape
that disagrees with the schema or with the sample's own .json.
"""
from __future__ import annotations

import io
import json
import wave

import numpy as np

from mmfm.data.audio import AUDIO_EXTS, decode_audio, encode_flac
from mmfm.data.schema import SchemaError, primary_field
from mmfm.data.video import CONTAINER_EXTS, VideoClip, encode_mp4


class DecodeError(ValueError):
    """A field whose bytes do not decode; the message names the field and the reason."""


def _png_or_jpg(value, fmt: str) -> bytes:
    from PIL import Image

    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise SchemaError(f"{fmt} field needs a uint8 array (H, W) or (H, W, 1|3|4), got {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    kw = {"quality": 95} if fmt == "JPEG" else {"optimize": False, "compress_level": 6}
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def encode_wav(audio, sample_rate: int) -> bytes:
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or not np.isfinite(a).all():
        raise SchemaError(f"wav field needs a finite float array (N,) or (N, channels), got shape {a.shape}")
    pcm = (np.clip(a, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(a.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width != 2:
        raise DecodeError(f"wav: {8 * width}-bit samples; only 16-bit PCM is read")
    if len(raw) != n * channels * width:
        raise DecodeError(f"wav: header says {n} frames, data holds {len(raw) // (channels * width)}")
    pcm = np.frombuffer(raw, dtype="<i2").reshape(n, channels)
    return pcm.astype(np.float32) / 32767.0, rate


def encode_field(field: str, value, meta: dict | None = None) -> bytes:
    """Encode `value` as the bytes of a `field` member. Bytes pass through unchanged."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    ext = field.rsplit(".", 1)[-1]
    if ext == "txt":
        return str(value).encode("utf-8")
    if ext == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if ext == "png":
        return _png_or_jpg(value, "PNG")
    if ext == "jpg":
        return _png_or_jpg(value, "JPEG")
    if ext == "wav":
        if meta is None or "sample_rate" not in meta:
            raise SchemaError("wav field needs json field 'sample_rate'")
        return encode_wav(value, meta["sample_rate"])
    if ext == "flac":
        if meta is None or "sample_rate" not in meta:
            raise SchemaError("flac field needs json field 'sample_rate'")
        return encode_flac(value, meta["sample_rate"])
    if ext == "mp4":
        if meta is None or "fps" not in meta:
            raise SchemaError("mp4 field needs json field 'fps'")
        try:
            return encode_mp4(value, float(meta["fps"]))
        except ValueError as e:
            raise SchemaError(str(e)) from e
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext == "npz":
        if not isinstance(value, dict):
            raise SchemaError(f"npz field needs a dict of arrays, got {type(value).__name__}")
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in value.items()})
        return buf.getvalue()
    if ext == "ply":
        import trimesh

        pts = np.asarray(value["points"], dtype=np.float32)
        faces = value.get("faces")
        if faces is not None and len(faces):
            mesh = trimesh.Trimesh(vertices=pts, faces=np.asarray(faces), process=False)
        else:
            mesh = trimesh.PointCloud(pts)
        return mesh.export(file_type="ply", encoding="binary")
    raise SchemaError(f"no encoder for field {field!r} from a value (known: txt json png jpg wav flac mp4 npy npz ply; "
                      f"any field takes bytes as they are)")


def decode_field(field: str, data: bytes):
    """Decode the bytes of a `field` member; raises DecodeError naming the field."""
    ext = field.rsplit(".", 1)[-1]
    try:
        if ext == "txt":
            return data.decode("utf-8")
        if ext == "json":
            return json.loads(data.decode("utf-8"))
        if ext in ("png", "jpg", "jpeg", "webp"):
            from mmfm.data.images import decode_image

            return decode_image(data)[0]
        if ext == "wav":
            try:
                return decode_wav(data)
            except (DecodeError, wave.Error):
                return decode_audio(data, "wav")  # 24-bit, 32-bit, float, WAVE_FORMAT_EXTENSIBLE: soundfile
        if ext in AUDIO_EXTS:
            return decode_audio(data, ext)
        if ext in CONTAINER_EXTS:
            return VideoClip(data)
        if ext == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if ext == "npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if ext == "ply":
            import trimesh

            mesh = trimesh.load(io.BytesIO(data), file_type="ply", process=False)
            out = {"points": np.asarray(mesh.vertices, dtype=np.float32)}
            if getattr(mesh, "faces", None) is not None and len(mesh.faces):
                out["faces"] = np.asarray(mesh.faces)
            return out
    except DecodeError:
        raise
    except ImportError as e:
        raise DecodeError(f"field {field!r}: decoder not installed ({e})") from e
    except Exception as e:  # every library has its own exception types for bad bytes
        raise DecodeError(f"field {field!r}: {type(e).__name__}: {e}") from e
    return data  # unknown fields stay bytes


def _finite(key: str, field: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise SchemaError(f"sample {key!r}: field {field!r} holds NaN or infinite values")


def _shape(key: str, field: str, arr: np.ndarray, ndim: int, what: str) -> None:
    if arr.ndim != ndim:
        raise SchemaError(f"sample {key!r}: field {field!r} has shape {arr.shape}; expected {what}")


def check_sample(key: str, sample: dict) -> None:
    """Check decoded values against the schema and the sample's own .json; raises SchemaError."""
    meta = sample.get("json")
    if meta is None:
        raise SchemaError(f"sample {key!r} has no .json")
    modality = meta["modality"]
    field = primary_field(modality, sample)
    value = sample[field]
    if modality == "text":
        if not isinstance(value, str):
            raise SchemaError(f"sample {key!r}: field 'txt' is not text")
    elif modality == "image":
        if value.ndim not in (2, 3) or value.shape[:2] != (meta["height"], meta["width"]):
            raise SchemaError(f"sample {key!r}: field {field!r} has shape {value.shape}; json says "
                              f"{meta['height']}x{meta['width']}")
    elif modality == "audio":
        audio, rate = value
        _finite(key, field, audio)
        if rate != meta["sample_rate"] or audio.shape[0] != meta["num_samples"]:
            raise SchemaError(f"sample {key!r}: field {field!r} has {audio.shape[0]} samples at {rate} Hz; json says "
                              f"{meta['num_samples']} at {meta['sample_rate']} Hz")
    elif modality == "video" and isinstance(value, VideoClip):
        got = (value.num_frames, value.height, value.width)
        want = (meta["num_frames"], meta["height"], meta["width"])
        if got != want:
            raise SchemaError(f"sample {key!r}: field {field!r} holds {got[0]} frames of {got[2]}x{got[1]}; json says "
                              f"{want[0]} of {want[2]}x{want[1]}")
        if abs(value.fps - float(meta["fps"])) > 1e-3 * value.fps:
            raise SchemaError(f"sample {key!r}: field {field!r} runs at {value.fps:g} fps; json says {meta['fps']}")
    elif modality == "video":
        frames = value.get("frames")
        if frames is None:
            raise SchemaError(f"sample {key!r}: field 'npz' has no array 'frames'")
        want = (meta["num_frames"], meta["height"], meta["width"], 3)
        if frames.shape != want:
            raise SchemaError(f"sample {key!r}: field 'npz' array 'frames' has shape {frames.shape}; expected {want}")
    elif modality == "shape3d":
        pts = value.get("points")
        if pts is None:
            raise SchemaError(f"sample {key!r}: field {field!r} has no array 'points'")
        _shape(key, f"{field}:points", pts, 2, "(N, 3)")
        _finite(key, f"{field}:points", pts)
        if pts.shape != (meta["num_points"], 3):
            raise SchemaError(f"sample {key!r}: field {field!r} array 'points' has shape {pts.shape}; "
                              f"expected ({meta['num_points']}, 3)")
        if "normals" in value:
            _finite(key, f"{field}:normals", value["normals"])
            if value["normals"].shape != pts.shape:
                raise SchemaError(f"sample {key!r}: field {field!r} array 'normals' has shape "
                                  f"{value['normals'].shape}; expected {pts.shape}")
    elif modality == "physics":
        fields = value.get("fields")
        if fields is None:
            raise SchemaError(f"sample {key!r}: field 'npz' has no array 'fields'")
        ndim = 2 + len(meta["grid_spacing"])
        _shape(key, "npz:fields", fields, ndim, f"(T, C, *grid) with {len(meta['grid_spacing'])} grid dims")
        if fields.shape[1] != len(meta["channel_names"]):
            raise SchemaError(f"sample {key!r}: field 'npz' array 'fields' has {fields.shape[1]} channels; json "
                              f"lists {len(meta['channel_names'])} channel_names")
        _finite(key, "npz:fields", fields)
