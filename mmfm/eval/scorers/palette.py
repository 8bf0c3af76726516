"""Segmentation of rendered scenes and clips, and colour names from the renderer's palette
(mmfm.data.demo_corpus.images.COLORS).

The renderer paints one flat colour on a flat background, so a decoded image is read back without
learning anything: the background colour is the median pixel (the object covers at most ~13% of a
scene), the object is the pixels far from it, and its colour is the palette colour nearest to the
object's median pixel. A MARGIN-pixel frame is ignored: the demo image tokenizer's decoder smears
its borders, which would otherwise count as object.
"""
from __future__ import annotations

import numpy as np
import torch

from mmfm.data.demo_corpus.images import COLORS

NAMES = tuple(COLORS)
RGB = torch.tensor([COLORS[n] for n in NAMES], dtype=torch.float32) / 255.0   # [8, 3]
FOREGROUND = 0.25   # RGB distance (0-1 units) from the background colour that counts as object
CORE = 0.25        # of the object pixels, the farthest from the background, that name its colour
MARGIN = 2          # pixels at each border left out (of a 32-pixel image)


def _inner(h: int, w: int) -> torch.Tensor:
    m = MARGIN if min(h, w) > 4 * MARGIN else 0
    inner = torch.zeros(h, w, dtype=torch.bool)
    inner[m:h - m, m:w - m] = True
    return inner


def background_colour(frames: torch.Tensor) -> torch.Tensor:
    """The median inner pixel of [..., 3, H, W] -> [3]."""
    f = frames.float().clamp(0, 1).reshape(-1, 3, *frames.shape[-2:]).permute(0, 2, 3, 1)
    return f[:, _inner(*f.shape[1:3])].reshape(-1, 3).median(0).values


def object_mask(img: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """bool [H, W]: inner pixels far from the background colour."""
    d = (img.float().clamp(0, 1).permute(1, 2, 0) - bg).norm(dim=-1)
    return (d > FOREGROUND) & _inner(*img.shape[-2:])


def colour_name(rgb: torch.Tensor) -> str:
    return NAMES[int(torch.cdist(rgb.float()[None], RGB).argmin())]


def object_colour(img: torch.Tensor, mask: torch.Tensor, bg: torch.Tensor) -> str:
    """The palette name nearest to the median pixel of the object's core ('none' without object
    pixels): the CORE fraction of its pixels farthest from the background colour. A decoder blurs a
    small object into a rim of object-background mixtures (a yellow disc on black gets an orange
    rim, a red one on white a pink rim) that can outnumber its inner pixels; the median over the
    whole mask then names the mixture. On a sharp render every object pixel is the core."""
    if not bool(mask.any()):
        return "none"
    px = img.float().clamp(0, 1).permute(1, 2, 0)[mask]
    k = max(1, int(round(CORE * len(px))))
    px = px[(px - bg).norm(dim=-1).topk(k).indices]
    return colour_name(px.median(0).values)


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
