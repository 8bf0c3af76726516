"""Segmentation of rendered scenes and clips by the renderer's palette (mmfm.data.demo.images.COLORS).

The renderer paints flat palette colours on a flat palette background, so a decoded image is read
back without learning anything: the background is the palette colour most pixels are nearest to,
the object is the pixels far from the background colour, and its colour is the palette colour most
of its pixels are nearest to (edge pixels blend two colours; the interior outvotes them).
"""
from __future__ import annotations

import numpy as np
import torch

from mmfm.data.demo.images import COLORS

NAMES = tuple(COLORS)
RGB = torch.tensor([COLORS[n] for n in NAMES], dtype=torch.float32) / 255.0   # [8, 3]
FOREGROUND = 0.25   # RGB distance (0-1 units) from the background colour that counts as object
MATCH = 0.35        # at most this far from a palette colour to vote for it


def _nearest(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """img [3, H, W] in [0, 1] -> (palette index [H, W], distance to it [H, W])."""
    px = img.float().clamp(0, 1).permute(1, 2, 0).reshape(-1, 3)
    d = torch.cdist(px, RGB)
    dist, idx = d.min(1)
    return idx.reshape(img.shape[1:]), dist.reshape(img.shape[1:])


def background(frames: torch.Tensor) -> int:
    """The palette index most pixels of [..., 3, H, W] are nearest to."""
    f = frames.reshape(-1, 3, *frames.shape[-2:])
    idx = torch.cat([_nearest(x)[0].reshape(-1) for x in f])
    return int(torch.bincount(idx, minlength=len(NAMES)).argmax())


def object_mask(img: torch.Tensor, bg: int) -> torch.Tensor:
    """bool [H, W]: pixels far from the background colour."""
    d = (img.float().clamp(0, 1).permute(1, 2, 0) - RGB[bg]).norm(dim=-1)
    return d > FOREGROUND


def object_colour(img: torch.Tensor, bg: int, mask: torch.Tensor | None = None) -> str:
    """The palette name most object pixels are nearest to ('none' without object pixels)."""
    mask = object_mask(img, bg) if mask is None else mask
    idx, dist = _nearest(img)
    vote = idx[mask & (dist < MATCH) & (idx != bg)]
    if vote.numel() == 0:
        return "none"
    return NAMES[int(torch.bincount(vote, minlength=len(NAMES)).argmax())]


def centroid(mask: torch.Tensor) -> tuple[float, float] | None:
    """(x, y) of the mask's pixel centres as fractions of the width and height; None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    h, w = mask.shape
    return float((xs.float() + 0.5).mean()) / w, float((ys.float() + 0.5).mean()) / h


def mask_features(mask: torch.Tensor, side: int = 12) -> np.ndarray:
    """The object mask cropped to its bounding box and resized to side x side, plus its fill ratio
    and aspect: what tells a circle from a square from a triangle at any position and size."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return np.zeros(side * side + 2, np.float32)
    crop = mask[int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1].float()
    small = torch.nn.functional.interpolate(crop[None, None], size=(side, side), mode="bilinear",
                                            align_corners=False)[0, 0]
    h, w = crop.shape
    return np.concatenate([small.reshape(-1).numpy(), [float(crop.mean()), h / (h + w)]]).astype(np.float32)
