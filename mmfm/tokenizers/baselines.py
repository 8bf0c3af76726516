"""Honest baselines at the tokenizer's bit budget (what eval compares each tokenizer against).

Every baseline gets exactly `bits` per sample (audio: per second) and spends them the obvious
non-learned way:
    image   bicubic: downsample to the largest s x s RGB at 8 bits per value within the budget, upsample
    video   the same per frame, the budget split evenly over the frames
    audio   mu-law: low-pass resample to the rate that 8-bit mu-law samples fill, then back up
    physics subsample each frame to the largest s x s grid of float16 values, bicubic interpolation back
    3D      random subsampling to as many float16 xyz points as fit
"""
from __future__ import annotations

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
