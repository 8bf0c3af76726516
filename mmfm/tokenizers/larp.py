"""LARP's two training-time pieces for the video tokenizer (arXiv:2410.21264): the stochastic vector
quantizer (SVQ) and the small autoregressive prior trained jointly with the tokenizer.

SVQ: latents and codes are l2-normalised; in training the index of a token is drawn from
softmax(cos(z, e_j) / temperature) instead of taken as the argmax (at eval it is the argmax, so
encoding is deterministic). The quantized vector is z + sg(e_k - z) (straight-through); the loss is
||e_k - sg(z)||^2 + beta ||z - sg(e_k)||^2, as for a plain VQ. Why stochastic: the prior is fitted
to the drawn indices, so it learns a distribution over codes near each latent rather than one
code, and the encoder is not rewarded for a hard, brittle assignment. Draws use the module's own
CPU generator (Gumbel-max), so they do not touch the global random state and a checkpoint holds
them (mmfm/tokenizers/train.py saves every torch.Generator a tokenizer owns).

The prior (`ARPrior`): a causal transformer over the Q quantized query vectors. Position i reads the
straight-through quantized vectors of tokens < i (a learned start vector at position 0) and
predicts token i's index with a linear head; its loss is the next-token cross-entropy on the
indices the quantizer chose in this step (LARP's `loss_latent_ce`). The gradient reaches the
encoder through the prior's inputs: they are the straight-through quantized latents, so the
encoder is pushed to make each token's latent informative about the tokens after it, and the
prior's parameters learn to predict. The targets are indices and carry no gradient (LARP does the
same). The tokenizer adds prior_weight x this loss to its reconstruction loss.

Dead-code revival (`revive_after` > 0; not in the paper, which trains 8,192 codes on far more data):
a code no draw has picked for `revive_after` training steps is moved onto a latent of the current
batch (one not already chosen). Without it the demo-size SVQ collapses onto ~20 of its 1,000 codes;
with it 120-180 stay in use, but on the demo's clips that made both reconstruction and the prior's
loss worse (docs/benchmarks.md, "video: LARP's prior"), so it is off by default. Under several ranks the steps since use are max-reduced and
rank 0's replacement rows broadcast, so every rank keeps the same codebook.

Left out from the paper: its scheduled sampling (a second prior round fed with the prior's own
draws) and its logits as a dot product with the detached codebook; the head here is a plain
linear layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StochasticVQ(nn.Module):
    """LARP's SVQ over `codebook_size` l2-normalised codes of size `dim`."""

    def __init__(self, dim: int, codebook_size: int, temperature: float, beta: float, seed: int,
                 revive_after: int = 0):
        super().__init__()
        self.dim, self.size, self.temperature, self.beta = dim, codebook_size, temperature, beta
        init = torch.randn(codebook_size, dim, generator=torch.Generator().manual_seed(seed))
        self.codebook = nn.Parameter(F.normalize(init, dim=-1))
        self._draws = torch.Generator().manual_seed(seed + 1)
        self.revive_after = revive_after
        self.revived = 0                  # codes moved in the last training step (a metric)
        if revive_after > 0:              # only then: saved tokenizers without revival keep their state_dict
            self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
            self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
            self._revive_draws = torch.Generator().manual_seed(seed + 2)

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    def similarities(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.float(), dim=-1) @ self.codes().float().t()

    def forward(self, z: torch.Tensor):
        """(quantized [.., dim] straight-through, indices [..], codebook + commitment loss)."""
        zn = F.normalize(z.float(), dim=-1)
        codes = self.codes().float()
        sim = zn.detach() @ codes.detach().t()
        if self.training and self.temperature > 0:
            # Gumbel-max: argmax(logits + g) is a draw from softmax(logits); g from the module's generator
            u = torch.rand(sim.shape, generator=self._draws).clamp_(1e-9, 1 - 1e-9).to(sim.device)
            idx = (sim / self.temperature - torch.log(-torch.log(u))).argmax(-1)
        else:
            idx = sim.argmax(-1)
        q = F.embedding(idx, codes)
        loss = F.mse_loss(q, zn.detach()) + self.beta * F.mse_loss(zn, q.detach())
        if self.training and self.revive_after > 0:
            self._revive(zn.detach().reshape(-1, self.dim), idx.reshape(-1))
        return zn + (q - zn).detach(), idx, loss

    @torch.no_grad()
    def _revive(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        """After this step's draws (the loss above used the codebook as it was): move every code unused
        for revive_after steps onto a distinct latent of the batch."""
        dist = torch.distributed
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.train_step += 1
        self.last_used[idx.unique()] = self.train_step
        if multi:
            dist.all_reduce(self.last_used, op=dist.ReduceOp.MAX)
        dead = (self.train_step - self.last_used) >= self.revive_after
        n_dead = int(dead.sum())
        self.revived = n_dead
        if n_dead == 0:
            return
        n = rows.shape[0]
        pick = (torch.randperm(n, generator=self._revive_draws)[:n_dead] if n >= n_dead
                else torch.randint(n, (n_dead,), generator=self._revive_draws)).to(rows.device)
        new = F.normalize(rows[pick].float(), dim=-1)
        if multi:
            dist.broadcast(new, 0)
        # .data: this step's graph holds the codebook as it was; a dead code got no draw, so no gradient
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        self.last_used[dead] = self.train_step

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.similarities(z).argmax(-1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codes().float())


class ARPrior(nn.Module):
    """Causal transformer over `length` quantized vectors of size `dim`; logits over `vocab` codes."""

    def __init__(self, dim: int, vocab: int, length: int, width: int, depth: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False)

    def logits(self, zq: torch.Tensor) -> torch.Tensor:
        """zq [B, L, dim] -> logits [B, L, vocab]; position i depends on zq[:, :i] only."""
        b = zq.shape[0]
        x = torch.cat([self.start.expand(b, 1, -1), self.inp(zq[:, :-1])], 1) + self.pos
        return self.head(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))

    def loss(self, zq: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token)."""
        lg = self.logits(zq)
        return F.cross_entropy(lg.flatten(0, 1).float(), indices.reshape(-1))


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
