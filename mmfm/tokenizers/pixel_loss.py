"""The pixel reconstruction loss of the image and video tokenizers: mse or l1, optionally weighing
the pixels of an object more than its background.

A small object covers ~3% of a demo scene's pixels (a moving one in a clip about the same), so an
unweighted loss spends the codes on the flat background every image shares, and the decoder returns
a small object as a faint blur of a neighbouring colour, or not at all (docs/training.md, "Fifth
round"). `object_weight` w weighs each pixel far from its sample's median colour 1 + w times.
"""
from __future__ import annotations

import torch

RECON_LOSSES = ("mse", "l1")
FOREGROUND = 0.25   # RGB distance (0-1 units) from the sample's median colour that counts as object


def object_pixels(x: torch.Tensor) -> torch.Tensor:
    """float [B, ..., 1, H, W] for x [B, ..., 3, H, W] (images, or clips [B, T, 3, H, W]): 1 where a
    pixel is far (> FOREGROUND) from its sample's median colour (over all its pixels and frames)."""
    b, c = x.shape[0], x.shape[-3]
    px = x.movedim(-3, -1).reshape(b, -1, c)
    bg = px.median(dim=1).values
    far = ((px - bg[:, None]).norm(dim=-1) > FOREGROUND).float()
    return far.reshape(*x.movedim(-3, -1).shape[:-1]).unsqueeze(-3)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, kind: str = "mse",
                        object_weight: float = 0.0) -> torch.Tensor:
    """The pixel loss (mse or l1) of [B, ..., 3, H, W] batches, each pixel far from its sample's median
    colour weighed 1 + object_weight times; normalised by the weights' sum, so object_weight = 0 is
    the plain mean."""
    err = (recon - x) ** 2 if kind == "mse" else (recon - x).abs()
    if object_weight <= 0:
        return err.mean()
    w = 1 + object_weight * object_pixels(x)
    return (err * w).sum() / (w.sum() * x.shape[-3])


def check_recon_fields(recon_loss: str, object_weight: float) -> None:
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss: expected one of {', '.join(RECON_LOSSES)}, got {recon_loss!r}")
    if not (isinstance(object_weight, (int, float)) and object_weight >= 0):
        raise ValueError(f"object_weight: expected a number >= 0, got {object_weight!r}")
