"""Video scorer, computed (nothing fitted): the moving object's colour in the first frame and its
direction of motion from the track of its centroid (the non-background pixels of each frame)."""
from __future__ import annotations

import numpy as np
import torch

from mmfm.data.video import frames_of
from mmfm.eval.scorers import palette

DIRECTIONS = ("moves left to right", "moves right to left", "moves top to bottom", "moves bottom to top")
STILL = "still"
MIN_TRAVEL = 0.1   # of the frame side, first to last frame; less is "still"


def as_video(sample) -> torch.Tensor:
    """A shard sample (an encoded clip, or npz frames [T, H, W, 3] uint8) or a [T, 3, H, W] tensor
    -> float [T, 3, H, W]. A clip gives all its frames at its own rate."""
    if isinstance(sample, torch.Tensor):
        return sample.float().clamp(0, 1)
    arr = frames_of(sample, owner="video scorer")
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def direction(frames: torch.Tensor, bg: torch.Tensor) -> str:
    track = [palette.centroid(palette.object_mask(f, bg)) for f in frames]
    track = [c for c in track if c is not None]
    if len(track) < 2:
        return STILL
    dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        return STILL
    if abs(dx) >= abs(dy):
        return DIRECTIONS[0] if dx > 0 else DIRECTIONS[1]
    return DIRECTIONS[2] if dy > 0 else DIRECTIONS[3]


class ClipScorer:
    tasks = ("colour", "direction")

    def predict(self, videos: list[torch.Tensor]) -> dict[str, list[str]]:
        colours, dirs = [], []
        for v in videos:
            bg = palette.background_colour(v)
            colours.append(palette.object_colour(v[0], palette.object_mask(v[0], bg), bg))
            dirs.append(direction(v, bg))
        return {"colour": colours, "direction": dirs}
