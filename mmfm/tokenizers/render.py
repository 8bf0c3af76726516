"""PNG output with PIL only (no matplotlib): side-by-side grids and a simple line plot."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[C, H, W] or [H, W] float in [0, 1] -> uint8 [H, W, 3]."""
    a = img.detach().float().clamp(0, 1).cpu()
    if a.dim() == 2:
        a = a[None]
    if a.shape[0] == 1:
        a = a.repeat(3, 1, 1)
    return (a.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def normalise(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    return (x - lo) / max(hi - lo, 1e-12)


def save_pairs(path: str, pairs, scale: int = 2) -> None:
    """pairs: [(input [C,H,W] in [0,1], reconstruction)] -> one PNG, a row per pair, input left."""
    rows = [np.concatenate([to_uint8(a), np.full((a.shape[-2], 2, 3), 255, np.uint8), to_uint8(b)], 1)
            for a, b in pairs]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    img = Image.fromarray(np.concatenate(rows, 0))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def line_plot(path: str, xs, ys, title: str, xlabel: str, ylabel: str, size=(480, 320)) -> None:
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, w - 15, 30, h - 40
    d.rectangle([left, top, right, bottom], outline="black")
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-6 else (y0, y1)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
    d.line(pts, fill=(30, 90, 200), width=2)
    for (x, y), v, k in zip(pts, ys, xs):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
        d.text((x - 10, y - 16), f"{v:.1f}", fill="black")
        d.text((x - 4, bottom + 4), str(k), fill="black")
    d.text((left, 8), title, fill="black")
    d.text(((left + right) // 2 - 30, h - 18), xlabel, fill="black")
    d.text((4, top - 14), ylabel, fill="black")
    img.save(path)


_COLOURS = [(30, 90, 200), (200, 60, 40), (40, 150, 60), (150, 60, 180), (220, 140, 20), (20, 160, 170),
            (120, 120, 120), (0, 0, 0)]


def multi_line_plot(path: str, series: dict, title: str, xlabel: str, ylabel: str, size=(640, 420)) -> None:
    """series: {label: [(x, y), ...]}, one coloured polyline with dots per label and a legend."""
    if not series or not any(series.values()):
        raise ValueError(f"multi_line_plot: no points to draw for {path}")
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 55, w - 190, 30, h - 40
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):   # axis ticks at fifths of the range
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        d.text((px(xv) - 12, bottom + 4), f"{xv:.0f}", fill="black")
        d.text((4, py(yv) - 6), f"{yv:.3g}", fill="black")
    for k, (label, pts) in enumerate(series.items()):
        col = _COLOURS[k % len(_COLOURS)]
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([(right + 12, top + 8 + 16 * k), (right + 30, top + 8 + 16 * k)], fill=col, width=3)
        d.text((right + 34, top + 2 + 16 * k), label, fill="black")
    d.text((left, 8), title, fill="black")
    d.text(((left + right) // 2 - 40, h - 18), xlabel, fill="black")
    d.text((left + 4, top + 4), ylabel, fill="black")
    img.save(path)
