"""Video through PyAV (FFmpeg bundled in the `av` wheel): probe, sample frames with seeking, encode MP4.

Shards keep a clip as its original encoded bytes (`.mp4`, `.webm`, `.mkv`, `.mov`): a 16-frame
64x64 clip is a few kB as H.264 and 200 kB as raw frames. Decoding happens when a consumer asks
for frames, and only as far as it needs them:

    clip = VideoClip(data)                       # opens the container, reads the stream header,
                                                 # and demuxes (no decoding) to count the frames
    frames = sample_frames(clip, 9, fps=4, size=32, start=1.5)   # uint8 [9, 32, 32, 3]

`sample_frames` takes the frame shown at each target time start + i / fps (the native rate when
fps is None). When the next target lies more than SEEK_GAP seconds past the last decoded frame it
seeks (to the keyframe before the target) instead of decoding the gap, so taking 4 frames spread
over a long clip decodes a few GOPs, not the clip. Frames are resized by FFmpeg's swscale to a
square `size` (the tokenizers take square inputs; an image is resized the same way).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

CONTAINER_EXTS = ("mp4", "webm", "mkv", "mov")
SEEK_GAP = 1.0  # seconds: decoding further than this to reach a target costs more than a seek


class VideoError(ValueError):
    """A clip that does not open, has no video stream, or is truncated; says which and why."""


class VideoTooShort(VideoError):
    """A clip with fewer frames (at the asked rate) than the consumer needs."""


@dataclass
class VideoClip:
    """An encoded clip and what its container says about it. `data` stays the original bytes."""
    data: bytes = field(repr=False)
    width: int = 0
    height: int = 0
    fps: float = 0.0
    num_frames: int = 0        # counted by demuxing every packet, not read from the header
    duration: float = 0.0      # seconds, num_frames / fps
    codec: str = ""
    decoded_frames: int = field(default=0, compare=False)  # frames decoded so far (tests, benchmarks)

    def __post_init__(self):
        if not self.width:
            self._probe()

    def _probe(self) -> None:
        import av

        try:
            with av.open(io.BytesIO(self.data), mode="r") as c:
                if not c.streams.video:
                    raise VideoError("no video stream in the container")
                vs = c.streams.video[0]
                rate = vs.average_rate or vs.guessed_rate or vs.base_rate
                header_frames = int(vs.frames or 0)
                n = 0
                for packet in c.demux(vs):
                    if packet.size:
                        n += 1
                self.width, self.height = int(vs.codec_context.width), int(vs.codec_context.height)
                self.codec = vs.codec_context.name
        except VideoError:
            raise
        except Exception as e:  # av.error.InvalidDataError and friends: the bytes are not a clip
            raise VideoError(f"{type(e).__name__}: {e}") from e
        if not rate or rate <= 0:
            raise VideoError("the video stream has no frame rate")
        if n == 0 or not self.width or not self.height:
            raise VideoError(f"the video stream holds no frames ({self.width}x{self.height})")
        if header_frames and n < header_frames:
            raise VideoError(f"truncated: the header lists {header_frames} frames, the file holds {n}")
        self.fps, self.num_frames = float(rate), n
        self.duration = n / self.fps


def _frame_array(frame, size: int | None) -> np.ndarray:
    if size:
        frame = frame.reformat(width=size, height=size, format="rgb24")
    else:
        frame = frame.reformat(format="rgb24")
    return frame.to_ndarray()


def sample_frames(clip: VideoClip, num_frames: int, fps: float | None = None, size: int | None = None,
                  start: float = 0.0) -> np.ndarray:
    """uint8 [num_frames, H, W, 3]: the frames shown at start + i / fps (fps None: the clip's rate).

    Raises VideoTooShort when the clip ends before the last target, VideoError when decoding fails.
    """
    import av

    if num_frames < 1:
        raise ValueError(f"sample_frames: num_frames must be >= 1, got {num_frames}")
    rate = float(fps) if fps else clip.fps
    if rate <= 0:
        raise ValueError(f"sample_frames: fps must be > 0, got {fps}")
    targets = [start + i / rate for i in range(num_frames)]
    if targets[-1] >= clip.duration:
        raise VideoTooShort(f"clip of {clip.num_frames} frames at {clip.fps:g} fps ({clip.duration:.2f} s) is too short "
                            f"for {num_frames} frames at {rate:g} fps from {start:g} s")
    half = 0.5 / clip.fps  # a frame covers [t - half, t + half): it is the one shown at a target inside it
    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(clip.data), mode="r") as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            base = float(vs.start_time * vs.time_base) if vs.start_time else 0.0
            frames, sought, pos = None, float("-inf"), 0.0
            while len(out) < num_frames:
                target = targets[len(out)]
                # seek when the target is far ahead; `sought` keeps a long GOP from seeking to the same place forever
                if frames is None or (target - pos > SEEK_GAP and target > sought):
                    if target > SEEK_GAP:
                        c.seek(int((target - half + base) / vs.time_base), stream=vs, backward=True, any_frame=False)
                    sought, frames = target, c.decode(vs)
                frame = next(frames, None)
                if frame is None:
                    break
                clip.decoded_frames += 1
                pos = float(frame.time) - base if frame.time is not None else pos + 1 / clip.fps
                while len(out) < num_frames and pos + half > targets[len(out)]:
                    out.append(_frame_array(frame, size))
    except Exception as e:
        raise VideoError(f"decoding failed: {type(e).__name__}: {e}") from e
    if len(out) < num_frames:
        raise VideoTooShort(f"the clip ended after {len(out)} of {num_frames} frames at {rate:g} fps from {start:g} s")
    return np.stack(out)


def encoder_name() -> str:
    """H.264 (libx264) where the bundled FFmpeg has it, else MPEG-4 Part 2, which every build has."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:
        return "mpeg4"


def encode_mp4(frames, fps: float, crf: int = 18, keyframe_every: float = 1.0) -> bytes:
    """uint8 frames [T, H, W, 3] -> MP4 bytes (H.264 or MPEG-4 Part 2, see encoder_name)."""
    import av

    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[0] < 1:
        raise ValueError(f"mp4: frames must be uint8 [T >= 1, H, W, 3], got {arr.dtype} {arr.shape}")
    if not fps or fps <= 0:
        raise ValueError(f"mp4: fps must be > 0, got {fps}")
    h, w = arr.shape[1:3]
    codec = encoder_name()
    # 4:2:0 needs even sides; an odd-sized clip keeps its size in 4:4:4 (H.264 High 4:4:4 decodes everywhere FFmpeg does)
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 or codec == "mpeg4" else "yuv444p"
    if codec == "mpeg4" and (h % 2 or w % 2):
        raise ValueError(f"mp4: MPEG-4 Part 2 needs even width and height, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.codec_context.gop_size = max(1, round(fps * keyframe_every))  # a seek lands at most this far before a target
        if codec == "libx264":
            s.options = {"crf": str(crf), "preset": "medium"}
        else:
            s.bit_rate = max(200_000, 8 * w * h * int(fps))
        for img in arr:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return buf.getvalue()


def frames_of(sample: dict, num_frames: int | None = None, fps: float | None = None, size: int | None = None,
              owner: str = "video") -> np.ndarray:
    """uint8 frames [T, H, W, 3] of a decoded shard sample: an encoded clip (sampled at fps, resized
    to size, num_frames of them; all of them at the native rate when num_frames is None) or `.npz`
    frames (stored frames are never resampled in time: the first num_frames)."""
    for ext in CONTAINER_EXTS:
        clip = sample.get(ext)
        if isinstance(clip, np.ndarray) and clip.ndim == 4:  # a writer-ready sample: frames not encoded yet
            return clip if num_frames is None else clip[:num_frames]
        if isinstance(clip, VideoClip):
            if num_frames is None:
                num_frames = clip.num_frames if not fps else max(1, int(clip.duration * fps))
            return sample_frames(clip, num_frames, fps, size)
    npz = sample.get("npz")
    if not isinstance(npz, dict) or "frames" not in npz:
        raise ValueError(f"{owner}: sample {sample.get('__key__')!r} has no video field "
                         f"({', '.join(CONTAINER_EXTS)}) and no npz 'frames'")
    arr = np.asarray(npz["frames"])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{owner}: frames must be [T, H, W, 3] (3 channels), got {arr.shape}")
    return arr if num_frames is None else arr[:num_frames]
