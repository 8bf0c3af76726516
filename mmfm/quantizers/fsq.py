"""Finite scalar quantization (FSQ, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple", arXiv:2309.15505).

Each channel i is bounded and rounded to L_i levels: z_i -> round(floor(L_i/2) tanh(z_i)) (a
half-step offset for even L_i), scaled to [-1, 1]; the gradient is straight-through the rounding
and through the tanh bound (mmfm.ops.quant.fsq_quantize). The implicit codebook is the grid of
prod(L_i) points; an index is the mixed-radix number of the per-channel digits (channel 0
fastest). There is no codebook and no auxiliary loss.
"""
from __future__ import annotations

import torch

from mmfm.ops.quant import as_levels, fsq_indices_to_codes, fsq_quantize
from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_indices, check_last_dim, usage_metrics,
                                  zero_loss)


@QUANTIZERS.register("fsq", aliases=("FSQ",))
class FSQ(Quantizer):
    """FSQ over inputs [..., C] with C = len(levels); `levels` e.g. [8, 5, 5, 5] (each >= 2)."""

    def __init__(self, levels):
        super().__init__()
        try:
            values = [int(v) for v in levels]
        except (TypeError, ValueError):
            raise ValueError(f"FSQ: argument 'levels' must be a list of integers, got {levels!r}") from None
        if not values or min(values) < 2 or any(int(v) != v for v in levels):
            raise ValueError(f"FSQ: argument 'levels' must be a non-empty list of integers >= 2, got {levels!r}")
        try:
            self._levels_cpu = as_levels(values, "FSQ")
        except ValueError as exc:
            raise ValueError(f"FSQ: argument 'levels' {values}: {exc}") from None
        self._remember(levels=values)
        self.register_buffer("levels", self._levels_cpu.clone())
        self.dim = len(values)
        self._size = 1
        for v in values:
            self._size *= v

    @property
    def codebook_size(self) -> int:
        return self._size

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """codes in [-1, 1] (z's dtype, straight-through), indices int64 [...], loss 0."""
        check_last_dim(z, self.dim, "FSQ")
        codes, idx = fsq_quantize(z, self._levels_cpu)
        return QuantizerOutput(codes, idx, zero_loss(z), usage_metrics(idx, self._size))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        check_last_dim(z, self.dim, "FSQ")
        return fsq_quantize(z.detach(), self._levels_cpu)[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        check_indices(indices, "FSQ.decode", self._size)
        return fsq_indices_to_codes(indices, self._levels_cpu)

    def extra_repr(self) -> str:
        return f"levels={self._config['levels']}, codebook_size={self._size}"
