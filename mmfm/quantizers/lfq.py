"""Lookup-free quantization (LFQ, MAGVIT-v2: Yu et al. 2023, "Language Model Beats Diffusion --
Tokenizer is Key to Visual Generation", arXiv:2310.05737).

q_i = sign(z_i) in {-1, +1} with an identity straight-through gradient; index = sum_i 2^i [z_i > 0]
(implicit codebook of 2^dim codes; mmfm.ops.quant.lfq_quantize). The entropy penalty
E_n[H(p(c | z_n))] - gamma H(E_n[p(c | z_n)]), with p(c | z) = softmax_c(-||z - c||^2 / tau), asks
for confident per-sample assignments and an evenly used codebook (mmfm.ops.quant.lfq_entropy:
exact 2^d enumeration for d <= 16, the factorised per-bit form above).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.ops.quant import lfq_entropy, lfq_indices_to_codes, lfq_quantize
from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_float, check_indices, check_int,
                                  check_last_dim, usage_metrics)


@QUANTIZERS.register("lfq", aliases=("LFQ",))
class LFQ(Quantizer):
    """Binary (sign) quantization of inputs [..., dim], dim in [1, 62].

    loss = entropy_weight * (sample_entropy - diversity_gamma * codebook_entropy)
           + beta * ||z - sg(q)||^2
    The entropy terms are computed in training mode only (they cost O(N 2^d) for the exact form);
    in eval mode the loss is the commitment term alone. `exact_entropy=None` lets the op choose.
    """

    def __init__(self, dim: int, entropy_weight: float = 0.1, diversity_gamma: float = 1.0, beta: float = 0.25,
                 temperature: float = 1.0, exact_entropy: bool | None = None):
        super().__init__()
        self.dim = check_int(dim, "dim", "LFQ", 1, 62)
        self.entropy_weight = check_float(entropy_weight, "entropy_weight", "LFQ", 0.0)
        self.diversity_gamma = check_float(diversity_gamma, "diversity_gamma", "LFQ", 0.0)
        self.beta = check_float(beta, "beta", "LFQ", 0.0)
        self.temperature = check_float(temperature, "temperature", "LFQ", 0.0, low_open=True)
        if exact_entropy and self.dim > 16:
            raise ValueError(f"LFQ: argument 'exact_entropy' needs dim <= 16 (2^dim codes enumerated), got dim={dim}")
        self.exact_entropy = exact_entropy
        self._remember(dim=dim, entropy_weight=entropy_weight, diversity_gamma=diversity_gamma, beta=beta,
                       temperature=temperature, exact_entropy=exact_entropy)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.dim

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim, "LFQ")
        codes, idx = lfq_quantize(z)
        loss = self.beta * F.mse_loss(z.float(), codes.detach().float())
        metrics = usage_metrics(idx, self.codebook_size)
        if self.training and self.entropy_weight > 0:
            sample_h, codebook_h = lfq_entropy(z, self.temperature, self.exact_entropy)
            loss = loss + self.entropy_weight * (sample_h - self.diversity_gamma * codebook_h)
            metrics.update(sample_entropy=sample_h.detach(), codebook_entropy=codebook_h.detach())
        return QuantizerOutput(codes, idx, loss, metrics)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        check_last_dim(z, self.dim, "LFQ")
        return lfq_quantize(z.detach())[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        check_indices(indices, "LFQ.decode", self.codebook_size)
        return lfq_indices_to_codes(indices, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, entropy_weight={self.entropy_weight}, beta={self.beta}"
