"""Audio decode: WAV / FLAC / OGG through soundfile (libsndfile, bundled in its wheel), MP3 / M4A /
AAC / Opus through PyAV (FFmpeg, bundled in the `av` wheel). Every decoder returns the same thing:
(float32 [N, channels] in [-1, 1], sample rate). Resampling to a tokenizer's rate happens in the
tokenizer (`mmfm.tokenizers.audio.waveform_of`), so a shard keeps the original bytes and rate.
"""
from __future__ import annotations

import io

import numpy as np

SOUNDFILE_EXTS = ("wav", "flac", "ogg")
PYAV_EXTS = ("mp3", "m4a", "aac", "opus")
AUDIO_EXTS = SOUNDFILE_EXTS + PYAV_EXTS


class AudioError(ValueError):
    """Bytes that do not decode as audio; the message says why."""


def decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError: not audio, or cut short
        raise AudioError(f"{type(e).__name__}: {e}") from e
    return audio, int(rate)


def decode_pyav(data: bytes) -> tuple[np.ndarray, int]:
    """Every frame of the first audio stream, converted to planar float at the stream's own rate."""
    import av

    chunks = []
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.audio:
                raise AudioError("no audio stream in the container")
            st = c.streams.audio[0]
            rate, layout = int(st.rate), st.layout.name
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            for frame in c.decode(st):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
    except AudioError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends
        raise AudioError(f"{type(e).__name__}: {e}") from e
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.ascontiguousarray(np.concatenate(chunks, axis=1).T, dtype=np.float32), rate


def decode_audio(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    if ext in SOUNDFILE_EXTS:
        return decode_soundfile(data)
    if ext in PYAV_EXTS:
        return decode_pyav(data)
    raise AudioError(f"no audio decoder for .{ext} (known: {' '.join(AUDIO_EXTS)})")


def encode_flac(audio, sample_rate: int) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.asarray(audio, dtype=np.float32), int(sample_rate), format="FLAC")
    return buf.getvalue()
