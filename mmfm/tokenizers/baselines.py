"""Honest baselines at the tokenizer's bit budget (what eval compares each tokenizer against).

Every baseline gets `bits` per sample (audio: per second) and spends at most that, the obvious
non-learned way; eval records the bits each one really spent (`bits`), beside the budget:
    image   bicubic: downsample to the largest s x s RGB at 8 bits per value within the budget, upsample
    video   the same per frame, the budget split evenly over the frames
    audio   mu-law: low-pass resample to the rate that 8-bit mu-law samples fill, then back up
    physics subsample each frame to the largest s x s grid of float16 values, bicubic interpolation back
    3D      random subsampling to as many float16 xyz points as fit
    image   also JPEG and WebP (Pillow) at the highest quality within the bytes (`pillow_at_bytes`)
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F


def bicubic_down_up(x: torch.Tensor, bits: float) -> tuple[torch.Tensor, int]:
    """x [B, C, H, W] in [0, 1] -> (reconstruction, side s). 8 bits per value, C * s^2 values."""
    c, h = x.shape[1], x.shape[-1]
    s = max(1, min(h, int(math.floor(math.sqrt(bits / (8 * c))))))
    small = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
    small = (small.clamp(0, 1) * 255).round() / 255  # the 8-bit quantization the budget pays for
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1), s


def video_bicubic(x: torch.Tensor, bits: float) -> tuple[torch.Tensor, int]:
    b, t = x.shape[:2]
    recon, s = bicubic_down_up(x.flatten(0, 1), bits / t)
    return recon.reshape(x.shape), s


def mu_law_resample(x: torch.Tensor, rate: int, bits_per_second: float) -> tuple[torch.Tensor, int]:
    """x [B, N] at `rate` -> (reconstruction, the reduced rate). 8-bit mu-law at bits_per_second / 8 Hz."""
    from scipy.signal import resample_poly

    low = max(1, int(bits_per_second // 8))
    g = math.gcd(low, rate)
    out = []
    for w in x.cpu().numpy().astype(np.float64):
        small = resample_poly(w, low // g, rate // g)
        mu = 255.0
        y = np.sign(small) * np.log1p(mu * np.clip(np.abs(small), 0, 1)) / np.log1p(mu)
        y = np.round((y + 1) / 2 * 255) / 255 * 2 - 1                      # 8 bits per sample
        small = np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu
        up = resample_poly(small, rate // g, low // g)[: w.shape[0]]
        out.append(np.pad(up, (0, w.shape[0] - up.shape[0])))
    return torch.tensor(np.stack(out), dtype=torch.float32), low


def field_subsample(x: torch.Tensor, bits: float) -> tuple[torch.Tensor, int]:
    """x [B, T, C, H, W] -> (reconstruction, side s): float16 values (16 bits), C * s^2 per frame."""
    b, t, c, h, w = x.shape
    s = max(1, min(h, int(math.floor(math.sqrt(bits / t / (16 * c))))))
    f = x.flatten(0, 1)
    small = F.interpolate(f, size=(s, s), mode="area").half().float()
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).reshape(x.shape), s


def random_points(x: torch.Tensor, bits: float, seed: int = 0) -> tuple[torch.Tensor, int]:
    """x [B, N, >=3] -> (points [B, k, 3], k): k random float16 xyz points (48 bits each)."""
    k = max(1, int(bits // 48))
    g = torch.Generator().manual_seed(seed)
    out = torch.stack([p[torch.randperm(p.shape[0], generator=g)[:k], :3].half().float() for p in x])
    return out, k


# ------------------------------------------------------------------ standard codecs (Pillow)
_QUALITY = {"JPEG": (1, 95), "WEBP": (0, 100)}
_JPEG_TABLES = {0xC4, 0xDB, 0xFE} | set(range(0xE0, 0xF0))   # DHT, DQT, COM, APPn


def jpeg_abbreviated_size(data: bytes) -> int:
    """Bytes of a baseline JPEG less its Huffman / quantization tables and APP / COM segments: the
    size of JPEG's abbreviated image format, where a codec shares the tables (Pillow writes the
    standard tables, so they are the same for every image) and sends them once."""
    i, n = 2, 2   # SOI
    while i < len(data):
        if data[i] != 0xFF:
            raise ValueError("jpeg_abbreviated_size: argument 'data' is not a JPEG stream (marker expected)")
        marker, seg = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:   # start of scan: the rest (scan header, entropy-coded data, EOI) is per image
            return n + len(data) - i
        if marker not in _JPEG_TABLES:
            n += 2 + seg
        i += 2 + seg
    raise ValueError("jpeg_abbreviated_size: no start-of-scan marker in argument 'data'")


def _encode(img, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=quality, **({"method": 6} if fmt == "WEBP" else {}))
    return buf.getvalue()


def pillow_at_bytes(x: torch.Tensor, max_bytes: float, fmt: str, abbreviated: bool = False):
    """x [B, 3, H, W] in [0, 1] -> (reconstruction, bytes per image [B], quality per image [B]).

    Per image, the highest quality whose size is <= max_bytes (binary search over Pillow's quality);
    when even the lowest quality is larger, the lowest quality, over budget (its bytes say so).
    fmt: "JPEG" or "WEBP"; abbreviated (JPEG): size counted without the shared tables."""
    from PIL import Image

    if fmt not in _QUALITY:
        raise ValueError(f"pillow_at_bytes: argument 'fmt' must be one of {sorted(_QUALITY)}, got {fmt!r}")
    size = jpeg_abbreviated_size if abbreviated and fmt == "JPEG" else len
    out, used, qualities = [], [], []
    for img in (x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8):
        im = Image.fromarray(img)
        lo, hi = _QUALITY[fmt]
        best = lo
        while lo <= hi:
            mid = (lo + hi) // 2
            if size(_encode(im, fmt, mid)) <= max_bytes:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        data = _encode(im, fmt, best)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(back).permute(2, 0, 1))
        used.append(size(data))
        qualities.append(best)
    return torch.stack(out), used, qualities
