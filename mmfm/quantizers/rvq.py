"""Residual vector quantization (SoundStream, Zeghidour et al. 2021, arXiv:2107.03312; as used by
EnCodec, DAC and DM-Codec).

r_0 = z; k_m = argmin_j ||r_{m-1} - e^(m)_j||; r_m = r_{m-1} - e^(m)_{k_m}; z_q = sum_m e^(m)_{k_m}.
Quantizer dropout (SoundStream): in training, with probability `quantizer_dropout` a batch uses
only the first n ~ U{min_levels..num_levels} levels, so that any prefix of levels decodes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfm.ops.quant import residual_vq
from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_float, check_indices, check_int,
                                  check_last_dim, perplexity_of, usage_metrics)
from mmfm.quantizers.vq import VectorQuantizer


@QUANTIZERS.register("rvq", aliases=("ResidualVQ",))
class ResidualVQ(Quantizer):
    """`num_levels` VectorQuantizers (one codebook each) applied to the running residual.

    Training mode loops over the active levels with VectorQuantizer.quantize, so each level has its
    own loss (summed into `loss`), EMA / revival updates and usage metrics. Eval mode runs the
    fused op mmfm.ops.quant.residual_vq over all levels in one call; its per-level squared residual
    norms give the same loss values. `quantized` is z + sg(sum of codes - z) in both modes.
    Indices are [..., n] with n the number of levels used (num_levels in eval mode).
    Arguments as in VectorQuantizer (level m is seeded with seed + m); no cosine option, since
    normalising a residual is not meaningful.
    """

    def __init__(self, dim: int, codebook_size: int, num_levels: int, beta: float = 0.25, use_ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 1.0, revive_sampling: str = "distance",
                 quantizer_dropout: float = 0.0, min_levels: int = 1, seed: int = 0, sync_fn: Callable | None = None):
        super().__init__()
        self.num_levels = check_int(num_levels, "num_levels", "ResidualVQ", 1)
        self.quantizer_dropout = check_float(quantizer_dropout, "quantizer_dropout", "ResidualVQ", 0.0, 1.0)
        self.min_levels = check_int(min_levels, "min_levels", "ResidualVQ", 1, self.num_levels)
        self.quantizers = torch.nn.ModuleList(
            VectorQuantizer(dim, codebook_size, beta=beta, use_ema=use_ema, decay=decay, eps=eps,
                            dead_threshold=dead_threshold,
                            revive_sampling=revive_sampling, seed=seed + m, sync_fn=sync_fn)
            for m in range(self.num_levels))
        self.dim, self.seed = int(dim), int(seed)
        self._loss_weight = beta if use_ema else 1.0 + beta  # value of the VQ loss given the residual norm
        self._remember(dim=dim, codebook_size=codebook_size, num_levels=num_levels, beta=beta, use_ema=use_ema,
                       decay=decay, eps=eps, dead_threshold=dead_threshold, revive_sampling=revive_sampling,
                       quantizer_dropout=quantizer_dropout, min_levels=min_levels, seed=seed)
        self._generator: torch.Generator | None = None

    @property
    def codebook_size(self) -> int:
        return self.quantizers[0].codebook_size

    def codebooks(self) -> torch.Tensor:
        """All codebooks stacked [num_levels, K, D] (fp32)."""
        return torch.stack([q.codebook.float() for q in self.quantizers])

    def sample_num_levels(self) -> int:
        """Number of active levels for one training batch (quantizer dropout)."""
        if self.quantizer_dropout <= 0 or self.min_levels == self.num_levels:
            return self.num_levels
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        if float(torch.rand((), generator=self._generator)) >= self.quantizer_dropout:
            return self.num_levels
        return int(torch.randint(self.min_levels, self.num_levels + 1, (), generator=self._generator))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim, "ResidualVQ")
        if self.training:
            return self._forward_loop(z, self.sample_num_levels())
        zf = z.float()
        idx, q, norms = residual_vq(zf.detach().contiguous(), self.codebooks().detach())
        level_mse = norms.reshape(-1, self.num_levels).mean(0) / self.dim
        loss = self._loss_weight * level_mse.sum()
        metrics = self._metrics([idx[..., m] for m in range(self.num_levels)])
        return QuantizerOutput((zf + (q - zf).detach()).to(z.dtype), idx, loss, metrics)

    def _forward_loop(self, z: torch.Tensor, n: int) -> QuantizerOutput:
        residual = z.float()
        total = torch.zeros_like(residual)
        loss = residual.new_zeros(())
        indices, revived = [], 0.0
        for vq in self.quantizers[:n]:
            _, q, idx, level_loss, m = vq.quantize(residual)
            residual = residual - q.detach()
            total = total + q.detach()
            loss = loss + level_loss
            indices.append(idx)
            revived += float(m.get("revived", 0.0))
        zf = z.float()
        metrics = self._metrics(indices)
        metrics["revived"] = torch.tensor(revived)
        return QuantizerOutput((zf + (total - zf).detach()).to(z.dtype), torch.stack(indices, -1), loss, metrics)

    def _metrics(self, indices: list) -> dict:
        per = [usage_metrics(i, self.codebook_size) for i in indices]
        out = {"usage": torch.stack([p["usage"] for p in per]).mean(),
               "perplexity": torch.stack([p["perplexity"] for p in per]).mean(),
               "active_levels": torch.tensor(len(indices))}
        for m, p in enumerate(per):
            out[f"usage/level{m}"] = p["usage"]
            out[f"perplexity/level{m}"] = p["perplexity"]
        return out

    def encode(self, z: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Indices [..., n] of the first n = levels (default all) levels."""
        check_last_dim(z, self.dim, "ResidualVQ")
        n = self.num_levels if levels is None else check_int(levels, "levels", "ResidualVQ.encode", 1, self.num_levels)
        return residual_vq(z.detach().float().contiguous(), self.codebooks()[:n].detach())[0]

    def decode(self, indices: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Sum of the codes of the first `levels` levels (default: every column of indices [..., m])."""
        if not isinstance(indices, torch.Tensor) or indices.dim() < 1:
            raise ValueError("ResidualVQ.decode: argument 'indices' must be an int64 tensor [..., levels]")
        have = indices.shape[-1]
        if have > self.num_levels:
            raise ValueError(f"ResidualVQ.decode: argument 'indices' has {have} levels, "
                             f"the module has {self.num_levels}")
        n = have if levels is None else check_int(levels, "levels", "ResidualVQ.decode", 1, have)
        check_indices(indices, "ResidualVQ.decode", self.codebook_size)
        out = torch.zeros(indices.shape[:-1] + (self.dim,), device=indices.device)
        for m in range(n):
            out = out + F.embedding(indices[..., m], self.quantizers[m].codebook.float())
        return out

    def perplexity(self) -> list:
        """Per-level perplexity of the accumulated training usage histograms."""
        return [perplexity_of(q.code_usage) for q in self.quantizers]
