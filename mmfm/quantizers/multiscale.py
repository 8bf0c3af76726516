"""Multi-scale residual quantization of token sequences (VAT-style, "3D in 512 bytes"; the 1D analogue
of VAR's next-scale residual maps, Tian et al. 2024, arXiv:2404.02905).

For z [B, T, D] and scales n_1 < n_2 < ... (token counts): at scale s the residual is average-pooled
over T to n_s tokens, quantized with the scale's codebook, upsampled back to T (linear or nearest
interpolation) and subtracted. The output is the sum of the upsampled codes; the tokens are the
indices per scale, coarse to fine ([B, n_s] each, sum(scales) in all), the order used for AR.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_float, check_indices, check_int,
                                  check_last_dim)
from mmfm.quantizers.vq import VectorQuantizer

_MODES = ("linear", "nearest")


def pool_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, D] -> [B, n, D] by adaptive average pooling over T."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def upsample_tokens(x: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """[B, n, D] -> [B, length, D] by interpolation over the token axis."""
    kwargs = {"align_corners": False} if mode == "linear" else {}
    return F.interpolate(x.transpose(1, 2), size=length, mode=mode, **kwargs).transpose(1, 2)


@QUANTIZERS.register("multiscale_rvq", aliases=("MultiScaleResidualVQ",))
class MultiScaleResidualVQ(Quantizer):
    """One VectorQuantizer per scale (scale i seeded with seed + i); other arguments as VectorQuantizer.

    scales: strictly increasing token counts, e.g. (1, 2, 4, 8); the input length T must be at
    least the largest. upsample: "linear" or "nearest". decode(indices, length) accepts a prefix of
    the scales (coarse-to-fine partial decoding).
    """

    def __init__(self, dim: int, codebook_size: int, scales=(1, 2, 4, 8), beta: float = 0.25, use_ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 1.0, revive_sampling: str = "distance",
                 upsample: str = "linear", seed: int = 0, sync_fn: Callable | None = None):
        super().__init__()
        name = "MultiScaleResidualVQ"
        try:
            scales = [int(s) for s in scales]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: argument 'scales' must be a list of integers, got {scales!r}") from None
        if not scales or scales[0] < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"{name}: argument 'scales' must be non-empty, >= 1 and strictly increasing, got {scales}")
        if upsample not in _MODES:
            raise ValueError(f"{name}: argument 'upsample' must be one of {_MODES}, got {upsample!r}")
        check_float(beta, "beta", name, 0.0)
        self.dim, self.scales, self.upsample = check_int(dim, "dim", name, 1), scales, upsample
        self.quantizers = torch.nn.ModuleList(
            VectorQuantizer(dim, codebook_size, beta=beta, use_ema=use_ema, decay=decay, eps=eps,
                            dead_threshold=dead_threshold,
                            revive_sampling=revive_sampling, seed=seed + i, sync_fn=sync_fn)
            for i in range(len(scales)))
        self._remember(dim=dim, codebook_size=codebook_size, scales=scales, beta=beta, use_ema=use_ema, decay=decay,
                       eps=eps, dead_threshold=dead_threshold, revive_sampling=revive_sampling, upsample=upsample,
                       seed=seed)

    @property
    def codebook_size(self) -> int:
        return self.quantizers[0].codebook_size

    @property
    def num_tokens(self) -> int:
        return sum(self.scales)

    def _check(self, z: torch.Tensor) -> None:
        check_last_dim(z, self.dim, "MultiScaleResidualVQ")
        if z.dim() != 3 or z.shape[1] < self.scales[-1]:
            raise ValueError(f"MultiScaleResidualVQ: argument 'z' must have shape [B, T, {self.dim}] with "
                             f"T >= {self.scales[-1]} (the largest scale), got {tuple(z.shape)}")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check(z)
        zf = z.float()
        residual, total = zf, torch.zeros_like(zf)
        loss = zf.new_zeros(())
        indices, metrics = [], {}
        for n, vq in zip(self.scales, self.quantizers):
            _, q, idx, level_loss, m = vq.quantize(pool_tokens(residual, n))
            up = upsample_tokens(q.detach(), z.shape[1], self.upsample)
            residual, total = residual - up, total + up
            loss = loss + level_loss
            indices.append(idx)
            metrics[f"usage/scale{n}"], metrics[f"perplexity/scale{n}"] = m["usage"], m["perplexity"]
        metrics["usage"] = torch.stack([metrics[f"usage/scale{n}"] for n in self.scales]).mean()
        metrics["perplexity"] = torch.stack([metrics[f"perplexity/scale{n}"] for n in self.scales]).mean()
        return QuantizerOutput((zf + (total - zf).detach()).to(z.dtype), indices, loss, metrics)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> list:
        """Indices per scale, [B, n_s] each, coarse to fine."""
        self._check(z)
        residual, indices = z.float(), []
        for n, vq in zip(self.scales, self.quantizers):
            idx = vq.encode(pool_tokens(residual, n))
            residual = residual - upsample_tokens(vq.decode(idx), z.shape[1], self.upsample)
            indices.append(idx)
        return indices

    def decode(self, indices, length: int | None = None) -> torch.Tensor:
        """[B, length, D] from the indices of the first len(indices) scales; length defaults to the largest scale."""
        if not isinstance(indices, (list, tuple)) or not 1 <= len(indices) <= len(self.scales):
            raise ValueError(f"MultiScaleResidualVQ.decode: argument 'indices' must be a list of 1..{len(self.scales)} "
                             "tensors [B, n_s], coarse to fine")
        length = self.scales[-1] if length is None else check_int(length, "length", "MultiScaleResidualVQ.decode",
                                                                  self.scales[-1])
        out = None
        for i, (n, vq, idx) in enumerate(zip(self.scales, self.quantizers, indices)):
            if idx.dim() != 2 or idx.shape[1] != n:
                raise ValueError(f"MultiScaleResidualVQ.decode: argument 'indices[{i}]' must have shape [B, {n}], "
                                 f"got {tuple(idx.shape)}")
            check_indices(idx, "MultiScaleResidualVQ.decode", self.codebook_size, f"indices[{i}]")
            up = upsample_tokens(vq.decode(idx), length, self.upsample)
            out = up if out is None else out + up
        return out
