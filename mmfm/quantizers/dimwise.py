"""Dimension-wise post-training quantization (TokenBridge: Wang et al. 2025, "Bridging Continuous and
Discrete Tokens for Autoregressive Visual Generation", arXiv:2503.16430).

Each channel of a trained continuous latent is discretised on its own: `fit` places num_bins - 1
edges per channel at the empirical quantiles j / num_bins of that channel (so every bin holds about
the same share of the fit data) and stores a center per bin (the mean of the fit data in the bin,
or the bin's median quantile). encode -> bin ids [..., C]; decode -> the centers. Edges and centers
are buffers, saved with the module.
"""
from __future__ import annotations

import torch

from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_int, check_last_dim, perplexity_of,
                                  zero_loss)

_CENTERS = ("mean", "median")


def column_quantiles(data: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Quantiles of each column of data [N, C] at probs [Q] (linear interpolation, as torch.quantile,
    without its input-size limit). Returns [C, Q]."""
    s = data.sort(0).values
    pos = probs.to(s) * (s.shape[0] - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    w = (pos - lo.to(s))[:, None]
    return (s[lo] * (1 - w) + s[hi] * w).t().contiguous()


@QUANTIZERS.register("dimwise", aliases=("DimensionwiseQuantizer",))
class DimensionwiseQuantizer(Quantizer):
    """Per-channel quantile bins for inputs [..., num_channels]; `codebook_size` is num_bins (per channel).

    Args: num_channels (>= 1), num_bins (>= 2), centers: "mean" (conditional mean of the fit data in
    each bin; an empty bin falls back to its median quantile) or "median".
    """

    def __init__(self, num_channels: int, num_bins: int, centers: str = "mean"):
        super().__init__()
        name = "DimensionwiseQuantizer"
        self.num_channels = check_int(num_channels, "num_channels", name, 1)
        self.num_bins = check_int(num_bins, "num_bins", name, 2)
        if centers not in _CENTERS:
            raise ValueError(f"{name}: argument 'centers' must be one of {_CENTERS}, got {centers!r}")
        self.center_mode = centers
        self._remember(num_channels=num_channels, num_bins=num_bins, centers=centers)
        self.register_buffer("edges", torch.zeros(self.num_channels, self.num_bins - 1))
        self.register_buffer("centers", torch.zeros(self.num_channels, self.num_bins))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def codebook_size(self) -> int:
        return self.num_bins

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> "DimensionwiseQuantizer":
        """Fit edges and centers to data [N, num_channels] (N >= 1, finite). Returns self."""
        check_last_dim(data, self.num_channels, "DimensionwiseQuantizer.fit", "data")
        if data.dim() != 2 or data.shape[0] < 1:
            raise ValueError(f"DimensionwiseQuantizer.fit: argument 'data' must have shape [N >= 1, "
                             f"{self.num_channels}], got {tuple(data.shape)}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("DimensionwiseQuantizer.fit: argument 'data' contains NaN or inf")
        x = data.detach().float().to(self.edges.device)
        nb = self.num_bins
        self.edges.copy_(column_quantiles(x, torch.arange(1, nb, device=x.device) / nb))
        medians = column_quantiles(x, (torch.arange(nb, device=x.device) + 0.5) / nb)
        if self.center_mode == "mean":
            ids = self._bucket(x).t()  # [C, N]
            sums = torch.zeros_like(medians).scatter_add_(1, ids, x.t())
            counts = torch.zeros_like(medians).scatter_add_(1, ids, torch.ones_like(x.t()))
            medians = torch.where(counts > 0, sums / counts.clamp_min(1), medians)
        self.centers.copy_(medians)
        self.fitted.fill_(True)
        return self

    def _require_fit(self, op: str) -> None:
        if not bool(self.fitted):
            raise ValueError(f"DimensionwiseQuantizer.{op}: the bins are not fitted; call fit(data) first")

    def _bucket(self, x: torch.Tensor) -> torch.Tensor:
        """Bin ids of x [..., C]: edges[c, i-1] < x <= edges[c, i] (torch.bucketize's rule, batched over
        channels with torch.searchsorted)."""
        rows = x.reshape(-1, self.num_channels).t().contiguous().to(self.edges.dtype)
        return torch.searchsorted(self.edges, rows).t().reshape(x.shape)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        check_last_dim(z, self.num_channels, "DimensionwiseQuantizer")
        self._require_fit("encode")
        return self._bucket(z.detach())

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        self._require_fit("decode")
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() < 1 \
                or indices.shape[-1] != self.num_channels:
            raise ValueError(f"DimensionwiseQuantizer.decode: argument 'indices' must be int64 [..., "
                             f"{self.num_channels}]")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_bins):
            raise ValueError(f"DimensionwiseQuantizer.decode: every entry of 'indices' must be in [0, {self.num_bins})")
        flat = indices.reshape(-1, self.num_channels).t()
        return self.centers.gather(1, flat).t().reshape(indices.shape)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Straight-through bin centers; metrics average the per-channel bin usage and perplexity."""
        idx = self.encode(z)
        q = self.decode(idx).to(z.dtype)
        counts = torch.zeros(self.num_channels, self.num_bins, device=idx.device).scatter_add_(
            1, idx.reshape(-1, self.num_channels).t(), torch.ones(self.num_channels, idx.numel() // self.num_channels,
                                                                  device=idx.device))
        metrics = {"usage": (counts > 0).float().mean(),
                   "perplexity": torch.stack([perplexity_of(c) for c in counts]).mean()}
        return QuantizerOutput(z + (q - z).detach(), idx, zero_loss(z), metrics)
