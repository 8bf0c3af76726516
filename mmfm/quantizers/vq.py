"""Vector quantization with a learned codebook (VQ-VAE, van den Oord et al. 2017, arXiv:1711.00937).

k = argmin_j ||z - e_j||^2 (mmfm.ops.quant.nearest_code: no N x K distance matrix),
z_q = z + sg(e_k - z) (straight-through). The codebook learns either from the loss
||sg(z) - e_k||^2 + beta ||z - sg(e_k)||^2, or (use_ema=True, VQ-VAE-2 / Razavi et al. 2019) from
exponential moving averages of per-code sums and counts with Laplace smoothing
(code_stats + ema_codebook_update) with only the beta commitment term in the loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfm.ops.quant import code_stats, ema_codebook_update, nearest_code
from mmfm.quantizers.base import (QUANTIZERS, QuantizerOutput, Quantizer, call_sync, check_float, check_indices,
                                  check_int, check_last_dim, perplexity_of, usage_metrics)


@QUANTIZERS.register("vq", aliases=("VectorQuantizer",))
class VectorQuantizer(Quantizer):
    """One codebook of `codebook_size` vectors of size `dim`.

    Args:
        dim, codebook_size: code vector size and number of codes (both >= 1).
        beta: commitment weight on ||z - sg(e_k)||^2.
        use_ema: learn the codebook by EMA k-means updates (decay, eps: Laplace smoothing) in
            training mode instead of by gradient; the codebook is then a buffer, not a Parameter.
        cosine: l2-normalise inputs and codes (ViT-VQGAN style); outputs are unit vectors.
        dead_threshold: a code whose EMA count per batch (the EMA of its assignment counts,
            `cluster_size`, kept in both modes with the same `decay`) falls below this is dead and
            is re-initialised from a random row of the current batch (kmeans-free revival).
            0 disables revival. Revived codes restart with cluster_size = dead_threshold.
        revive_sampling: "distance" (default) draws the revival rows without replacement with
            probability proportional to their squared distance to their current code (k-means++
            style: dead codes move to where the codebook serves the data worst); "uniform" draws
            them uniformly.
        seed: seeds the codebook init and the torch.Generator that picks revival rows. The
            generator state is not saved; a loaded module restarts its sequence from `seed`.
        sync_fn: cross-rank reduction, default None = no collective at all. When given it is
            called on the per-code (sums, counts) of the batch before the EMA / usage update, and
            on the revival candidates, and must sum them over ranks, in place (returning None)
            or by returning the result, e.g. `sync_fn=lambda t: torch.distributed.all_reduce(t)`.
            With W ranks a revived code is then the mean of W batch rows (one per rank), so that
            every rank writes the same codebook. Nothing in forward calls torch.distributed itself.

    Buffers: `cluster_size` [K] (EMA counts), `embed_sum` [K, D] (EMA mode), `code_usage` [K]
    int64 histogram of training assignments (see `perplexity()` and `reset_usage()`).
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25, use_ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, cosine: bool = False, dead_threshold: float = 1.0,
                 revive_sampling: str = "distance", seed: int = 0, sync_fn: Callable | None = None):
        super().__init__()
        name = type(self).__name__
        self.dim = check_int(dim, "dim", name, 1)
        self.num_codes = check_int(codebook_size, "codebook_size", name, 1)
        self.beta = check_float(beta, "beta", name, 0.0)
        self.decay = check_float(decay, "decay", name, 0.0, 1.0, high_open=True)
        self.eps = check_float(eps, "eps", name, 0.0, low_open=True)
        self.dead_threshold = check_float(dead_threshold, "dead_threshold", name, 0.0)
        if revive_sampling not in ("distance", "uniform"):
            raise ValueError(f"{name}: argument 'revive_sampling' must be 'distance' or 'uniform', "
                             f"got {revive_sampling!r}")
        self.revive_sampling = revive_sampling
        self.use_ema, self.cosine, self.seed = bool(use_ema), bool(cosine), int(seed)
        if sync_fn is not None and not callable(sync_fn):
            raise ValueError(f"{name}: argument 'sync_fn' must be callable or None")
        self.sync_fn = sync_fn
        self._remember(dim=dim, codebook_size=codebook_size, beta=beta, use_ema=use_ema, decay=decay, eps=eps,
                       cosine=cosine, dead_threshold=dead_threshold, revive_sampling=revive_sampling, seed=seed)

        init = torch.randn(self.num_codes, self.dim, generator=torch.Generator().manual_seed(self.seed))
        if self.cosine:
            init = F.normalize(init, dim=-1)
        if self.use_ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = torch.nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(self.num_codes))
        self.register_buffer("code_usage", torch.zeros(self.num_codes, dtype=torch.int64))
        self._generator: torch.Generator | None = None

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    def codes(self) -> torch.Tensor:
        """The code vectors as used for search and lookup (l2-normalised in cosine mode)."""
        return F.normalize(self.codebook, dim=-1) if self.cosine else self.codebook

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        check_last_dim(z, self.dim, type(self).__name__)
        z = z.float()
        return F.normalize(z, dim=-1) if self.cosine else z

    # ------------------------------------------------------------------ quantization
    def quantize(self, z: torch.Tensor):
        """Hard quantization without the straight-through step, for composite quantizers.

        Returns (z_in, q, indices, loss, metrics): z_in is z as fp32 (normalised in cosine
        mode), q = e_k (carries the codebook gradient in loss mode), and in training mode the
        EMA / usage / revival updates have been applied after the search.
        """
        z_in = self._prepare(z)
        codes = self.codes()
        idx, dist = nearest_code(z_in.detach().contiguous(), codes.detach().float().contiguous())
        q = F.embedding(idx, codes.float())
        commit = F.mse_loss(z_in, q.detach())
        loss = self.beta * commit if self.use_ema else F.mse_loss(q, z_in.detach()) + self.beta * commit
        metrics = usage_metrics(idx, self.num_codes)
        if self.training:
            metrics["revived"] = self._update(z_in.detach().reshape(-1, self.dim), idx.reshape(-1), dist.reshape(-1))
        return z_in, q, idx, loss, metrics

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z_in, q, idx, loss, metrics = self.quantize(z)
        quantized = z_in + (q - z_in).detach()
        return QuantizerOutput(quantized.to(z.dtype), idx, loss, metrics)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        idx, _ = nearest_code(self._prepare(z).detach().contiguous(), self.codes().detach().float().contiguous())
        return idx

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        check_indices(indices, f"{type(self).__name__}.decode", self.num_codes)
        return F.embedding(indices, self.codes().float())

    # ------------------------------------------------------------------ training-time state
    @torch.no_grad()
    def _update(self, rows: torch.Tensor, idx: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        if self.use_ema:
            sums, counts = code_stats(rows, idx, self.num_codes)
            sums, counts = call_sync(self.sync_fn, sums), call_sync(self.sync_fn, counts)
            size, embed_sum, codebook, dead = ema_codebook_update(self.cluster_size, self.embed_sum, counts, sums,
                                                                  self.decay, self.eps, self.dead_threshold)
            self.cluster_size.copy_(size)
            self.embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        else:
            counts = torch.bincount(idx, minlength=self.num_codes).float()
            counts = call_sync(self.sync_fn, counts)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            dead = self.cluster_size < self.dead_threshold
        self.code_usage.add_(counts.round().long())
        return self._revive(rows, dead, dist)

    def _revive(self, rows: torch.Tensor, dead: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        n_dead = int(dead.sum())
        if n_dead == 0 or self.dead_threshold <= 0:
            return torch.zeros((), device=rows.device)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        n = rows.shape[0]
        if n < n_dead:  # fewer rows than dead codes: draw with replacement
            pick = torch.randint(n, (n_dead,), generator=self._generator).to(rows.device)
        elif self.revive_sampling == "uniform":
            pick = torch.randperm(n, generator=self._generator)[:n_dead].to(rows.device)
        else:  # weighted sampling without replacement (Efraimidis-Spirakis keys log(u) / w)
            u = torch.rand(n, generator=self._generator, dtype=torch.float64).to(rows.device)
            keys = u.log() / (dist.double().clamp_min(0) + 1e-30)
            pick = keys.topk(n_dead).indices
        new = rows[pick].float()
        if self.sync_fn is not None:
            world = call_sync(self.sync_fn, torch.ones((), device=rows.device))
            new = call_sync(self.sync_fn, new.clone()) / world
        if self.cosine:
            new = F.normalize(new, dim=-1)
        # .data: the old codebook may be saved for backward (cosine mode); dead rows got no gradient
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        self.cluster_size[dead] = self.dead_threshold
        if self.use_ema:
            self.embed_sum[dead] = new * self.dead_threshold
        return torch.tensor(float(n_dead), device=rows.device)

    def perplexity(self) -> torch.Tensor:
        """exp(entropy) of the accumulated training usage histogram `code_usage` (0 if empty)."""
        return perplexity_of(self.code_usage)

    def usage_fraction(self) -> torch.Tensor:
        """Fraction of codes assigned at least once since the last `reset_usage()`."""
        return (self.code_usage > 0).float().mean()

    def reset_usage(self) -> None:
        self.code_usage.zero_()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.num_codes}, beta={self.beta}, use_ema={self.use_ema}, "
                f"cosine={self.cosine}, dead_threshold={self.dead_threshold}")
