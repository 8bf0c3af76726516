"""Soft vector quantization: a differentiable convex combination of codes (All in Tokens / AiT,
Ning et al. 2023, arXiv:2301.02229; SoftVQ-VAE, Chen et al. 2024, arXiv:2412.10958).

w_j = softmax_j(-||z - e_j||^2 / tau), z_soft = sum_j w_j e_j. As tau -> 0 this is hard VQ.
Full mode works `chunk` rows at a time (chunk x K logits, never N x K at once in inference);
the top-k variant takes the k nearest codes from mmfm.ops.quant.nearest_code(topk=k) and
softmaxes over those only (O(N k D) memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.ops.quant import nearest_code
from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, check_float, check_indices, check_int,
                                  check_last_dim, usage_metrics)


@QUANTIZERS.register("soft", aliases=("SoftVQ",))
class SoftVQ(Quantizer):
    """Soft assignment to a learned codebook [codebook_size, dim].

    Args: temperature tau (> 0); topk: None (softmax over all codes) or k in [1, codebook_size];
    beta: weight of the commitment term ||z - sg(z_soft)||^2 in `loss`; chunk: rows per block in
    full mode; seed: codebook init. `quantized` is z_soft itself (differentiable in z and the
    codebook, no straight-through); `indices` are the hard nearest codes.
    """

    def __init__(self, dim: int, codebook_size: int, temperature: float = 1.0, topk: int | None = None,
                 beta: float = 0.25, chunk: int = 1024, seed: int = 0):
        super().__init__()
        self.dim = check_int(dim, "dim", "SoftVQ", 1)
        self.num_codes = check_int(codebook_size, "codebook_size", "SoftVQ", 1)
        self.temperature = check_float(temperature, "temperature", "SoftVQ", 0.0, low_open=True)
        self.topk = None if topk is None else check_int(topk, "topk", "SoftVQ", 1, self.num_codes)
        self.beta = check_float(beta, "beta", "SoftVQ", 0.0)
        self.chunk = check_int(chunk, "chunk", "SoftVQ", 1)
        self._remember(dim=dim, codebook_size=codebook_size, temperature=temperature, topk=topk, beta=beta,
                       chunk=chunk, seed=seed)
        self.codebook = torch.nn.Parameter(torch.randn(self.num_codes, self.dim,
                                                       generator=torch.Generator().manual_seed(int(seed))))

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    def _full_weights(self, rows: torch.Tensor, e: torch.Tensor):
        """Yield the softmax weights of `chunk` rows at a time: -||z - e||^2 = 2 z.e - ||e||^2 - ||z||^2,
        the last term constant per row, so it drops out of the softmax."""
        e2 = (e * e).sum(-1)
        for c in rows.split(self.chunk):
            yield torch.softmax((2 * c @ e.t() - e2) / self.temperature, -1)

    def soft_assign(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [..., k], code ids [..., k]) with k = topk or codebook_size; weights sum to 1."""
        check_last_dim(z, self.dim, "SoftVQ")
        rows = z.float().reshape(-1, self.dim)
        e = self.codebook.float()
        if self.topk is not None:
            ids, _ = nearest_code(rows.detach().contiguous(), e.detach().contiguous(), topk=self.topk)
            ids = ids.reshape(-1, self.topk)
            w = torch.softmax(-((rows[:, None, :] - e[ids]) ** 2).sum(-1) / self.temperature, -1)
        else:
            w = torch.cat(list(self._full_weights(rows, e)))
            ids = torch.arange(self.num_codes, device=rows.device).expand(rows.shape[0], -1)
        lead = tuple(z.shape[:-1])
        return w.reshape(lead + (-1,)), ids.reshape(lead + (-1,))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim, "SoftVQ")
        zf = z.float()
        rows = zf.reshape(-1, self.dim)
        e = self.codebook.float()
        if self.topk is not None:
            w, ids = self.soft_assign(z)
            w, ids = w.reshape(-1, self.topk), ids.reshape(-1, self.topk)
            soft, hard = (w[..., None] * e[ids]).sum(1), ids[:, 0]
            entropy = _entropy(w.detach())
        else:  # chunked: the N x K weights are never formed at once (autograd keeps them in training)
            soft, entropy = [], []
            for w in self._full_weights(rows, e):
                soft.append(w @ e)
                entropy.append(_entropy(w.detach()))
            soft, entropy = torch.cat(soft), torch.cat(entropy)
            hard = nearest_code(rows.detach().contiguous(), e.detach().contiguous())[0]
        soft = soft.reshape(zf.shape)
        loss = self.beta * F.mse_loss(zf, soft.detach())
        metrics = usage_metrics(hard, self.num_codes)
        metrics["assignment_entropy"] = entropy.mean()
        return QuantizerOutput(soft.to(z.dtype), hard.reshape(zf.shape[:-1]), loss, metrics)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        check_last_dim(z, self.dim, "SoftVQ")
        return nearest_code(z.detach().float().contiguous(), self.codebook.detach().float().contiguous())[0]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Hard codes e_k for indices (the tau -> 0 limit of the soft output)."""
        check_indices(indices, "SoftVQ.decode", self.num_codes)
        return F.embedding(indices, self.codebook.float())


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-30).log()).sum(-1)
