"""A continuous head beside the token head: flow matching on the decoder's hidden state
(Flow-Omni, arXiv:2412.04917; xAR, arXiv:2502.20388; the MLP with adaLN is MAR's diffusion head's
shape, arXiv:2406.11838).

The token head gives p(next token | h). This head gives a distribution over a continuous vector
x1 in R^D (here: the TokenBridge autoencoder's pre-quantization latent of the next image patch)
conditioned on the same hidden state h, learned by conditional flow matching on the straight
(rectified-flow) path from Gaussian noise x0 to the data x1:

    x_t = (1 - t) x0 + t x1,   t ~ U(0, 1),   x0 ~ N(0, I)
    loss = || v(x_t, t, h) - (x1 - x0) ||^2        (mean over the D components)

v is a small MLP; sampling integrates dx/dt = v(x, t, h) from t = 0 to 1 with a few Euler steps.
The head works on standardised latents: `latent_mean` / `latent_std` (persistent buffers, set
once from data with `set_scale`, saved with the model) map the data scale to roughly unit
variance, which the N(0, I) start assumes.

Where the targets sit: the caller passes, per sequence position, the vector the hidden state AT
that position must predict (already shifted, like labels). For TokenBridge tokens (position-major,
C channel ids per patch) that is the position whose next token is the patch's first channel id:
the same hidden state the token head uses for that id. `flow_positions` computes it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT/MAR), [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class _AdaLNBlock(nn.Module):
    """x + gate(c) * MLP(LN(x) * (1 + scale(c)) + shift(c)); the modulation starts at zero, so a
    fresh block is the identity and depth does not disturb the start of training."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.mod[1].weight)
        nn.init.zeros_(self.mod[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(c).chunk(3, -1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """v(x_t, t, h): [N, latent_dim], [N], [N, cond_dim] -> [N, latent_dim]."""

    def __init__(self, cond_dim: int, latent_dim: int, width: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        if min(cond_dim, latent_dim, width, depth) < 1 or time_dim < 2 or time_dim % 2:
            raise ValueError(f"FlowHead: cond_dim, latent_dim, width, depth must be >= 1 and time_dim even >= 2, "
                             f"got {cond_dim}, {latent_dim}, {width}, {depth}, {time_dim}")
        self.latent_dim, self.time_dim = latent_dim, time_dim
        self.cond = nn.Linear(cond_dim, width)
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(width, latent_dim)
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    @torch.no_grad()
    def set_scale(self, latents: torch.Tensor) -> None:
        """Standardise with the per-component mean and std of latents [N, latent_dim] (data scale)."""
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] < 2:
            raise ValueError(f"FlowHead.set_scale: latents must be [N >= 2, {self.latent_dim}], "
                             f"got {tuple(latents.shape)}")
        self.latent_mean.copy_(latents.float().mean(0))
        self.latent_std.copy_(latents.float().std(0).clamp_min(1e-6))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c = self.cond(h) + self.time(timestep_embedding(t, self.time_dim).to(h.dtype))
        y = self.inp(x)
        for b in self.blocks:
            y = b(y, c)
        return self.out(self.out_norm(y))

    def _check(self, h: torch.Tensor, x1: torch.Tensor | None = None) -> None:
        if h.dim() != 2:
            raise ValueError(f"FlowHead: hidden states must be [N, cond_dim], got {tuple(h.shape)}")
        if x1 is not None and (x1.dim() != 2 or x1.shape != (h.shape[0], self.latent_dim)):
            raise ValueError(f"FlowHead: targets must be [N = {h.shape[0]}, {self.latent_dim}], got {tuple(x1.shape)}")

    def forward(self, h: torch.Tensor, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss: per-target flow-matching error [N] (mean over components, in
        standardised units) for targets x1 [N, latent_dim] in data scale. Noise and t come from
        `generator` (default: torch's). It is this module's forward so that DeepSpeed ZeRO-3 gathers
        the head's weights for it, as LMHead's loss does."""
        self._check(h, x1)
        z1 = (x1.float() - self.latent_mean) / self.latent_std
        x0 = torch.randn(z1.shape, generator=generator, device=z1.device if generator is None else "cpu").to(z1.device)
        t = torch.rand(z1.shape[0], generator=generator, device=z1.device if generator is None else "cpu").to(z1.device)
        xt = (1 - t[:, None]) * x0 + t[:, None] * z1
        v = self.velocity(xt.to(h.dtype), t, h).float()
        return (v - (z1 - x0)).pow(2).mean(-1)

    @torch.no_grad()
    def sample(self, h: torch.Tensor, steps: int = 8, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x1 [N, latent_dim] in data scale: Euler on dx/dt = v from x0 ~ N(0, temperature^2 I).
        temperature 0 starts every row at the origin (one deterministic point per h)."""
        self._check(h)
        if steps < 1:
            raise ValueError(f"FlowHead.sample: steps must be >= 1, got {steps}")
        shape = (h.shape[0], self.latent_dim)
        x = torch.randn(shape, generator=generator, device="cpu" if generator is not None else h.device).to(h.device)
        x = x.float() * temperature
        dt = 1.0 / steps
        for k in range(steps):
            t = torch.full((h.shape[0],), k * dt, device=h.device)
            x = x + dt * self.velocity(x.to(h.dtype), t, h).float()
        return x * self.latent_std + self.latent_mean


def flow_positions(ids: torch.Tensor, begin_id: int, end_id: int, channels: int) -> torch.Tensor:
    """bool [B, L]: the positions whose hidden state predicts a patch latent, for position-major
    TokenBridge tokens (`channels` ids per patch) between <begin_image> and <end_image>: the
    position just before each patch's first channel id. Patch k of an image starting after the
    marker at position s is predicted at s + k * channels."""
    B, L = ids.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    for b in range(B):
        row = ids[b].tolist()
        for s, tok in enumerate(row):
            if tok != begin_id:
                continue
            e = next((j for j in range(s + 1, L) if row[j] == end_id), L)
            n = e - s - 1
            if n % channels:
                raise ValueError(f"flow_positions: row {b}: an image of {n} tokens at position {s} is not a whole "
                                 f"number of {channels}-channel patches")
            out[b, s:s + n:channels] = True
    return out


@torch.no_grad()
def generate_patches(model, prefix: torch.Tensor, patches: int, channels: int,
                     quantize: Callable[[torch.Tensor], torch.Tensor], steps: int = 8, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate an image patch by patch with the continuous head: prefix [B, P] global ids ending
    with <begin_image>. At each patch the head samples the latent from the current hidden state;
    `quantize(latents [B, D]) -> ids [B, channels]` (global ids: TokenBridge's per-channel bins
    mapped into the unified vocabulary) gives the tokens the decoder reads next.

    Why the sample is re-quantized rather than fed back as a vector: the decoder reads token
    embeddings and was trained only on the bins' ids, so the ids of the nearest bins keep its
    input in the distribution it learned, with no new input projection to train; the information
    the bins drop is kept where it matters, in the latents returned for the image decoder.

    Returns (latents [B, patches, D] for the continuous decoder, ids [B, patches * channels])."""
    from mmfm.models.kv_cache import KVCache

    if getattr(model, "flow_head", None) is None:
        raise ValueError("generate_patches: the model has no flow head (model config flow_latent_dim is 0)")
    B = prefix.shape[0]
    cache = KVCache.for_model(model, batch=B, capacity=prefix.shape[1] + patches * channels)
    h = model(prefix, cache=cache, return_hidden=True)[:, -1]
    lats, ids = [], []
    for p in range(patches):
        z = model.flow_head.sample(h, steps, temperature, generator)
        tok = quantize(z)
        if tok.shape != (B, channels):
            raise ValueError(f"generate_patches: quantize must return [B = {B}, channels = {channels}] ids, "
                             f"got {tuple(tok.shape)}")
        lats.append(z)
        ids.append(tok)
        if p + 1 < patches:   # the last patch's ids need no forward
            h = model(tok.to(prefix.device), cache=cache, return_hidden=True)[:, -1]
    return torch.stack(lats, 1), torch.cat(ids, 1)


__all__ = ["FlowHead", "flow_positions", "generate_patches", "timestep_embedding"]
