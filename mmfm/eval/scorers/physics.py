"""Physics: the relative L2 error of a generated continuation against the solver's, and the two
baselines any forecaster must beat: repeat the last given frame, and the training mean field (the
mean over the training runs of each frame index)."""
from __future__ import annotations

import torch


def rel_l2(truth: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """||guess - truth|| / ||truth|| per run: [B, ...] -> [B]."""
    num = (guess.float() - truth.float()).flatten(1).norm(dim=1)
    return num / truth.float().flatten(1).norm(dim=1).clamp_min(1e-12)


def repeat_last(given: torch.Tensor, frames: int) -> torch.Tensor:
    """given [B, k, C, H, W] -> its last frame repeated `frames` times [B, frames, C, H, W]."""
    return given[:, -1:].expand(-1, frames, *given.shape[2:])


def mean_field(train_runs: torch.Tensor) -> torch.Tensor:
    """[N, T, C, H, W] training runs -> [T, C, H, W], the mean of each frame index."""
    if train_runs.dim() != 5 or train_runs.shape[0] == 0:
        raise ValueError(f"mean_field: need training runs [N >= 1, T, C, H, W], got {tuple(train_runs.shape)}")
    return train_runs.float().mean(0)
