"""3D: points (with normals) -> set encoder with learned queries -> multi-scale residual VQ -> points (VAT).

The encoder is an in-context transformer over the embedded points [xyz, normal] together with Q
learned queries; the queries' outputs are the latent sequence [B, Q, D]. MultiScaleResidualVQ
quantizes it coarse to fine (scales e.g. 1, 2, 4, 8, 16 tokens; VAT, "3D in 512 bytes"). The
decoder, a transformer over the Q quantized latents, lets each query emit out_points / Q points.
Loss: Chamfer distance to the input points. Metrics: Chamfer, F-score at `fscore_threshold`,
and bytes per shape = tokens * log2(codebook_size) / 8.

Input points are taken deterministically (evenly strided) to `num_points`; zero points is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mmfm.quantizers import MultiScaleResidualVQ
from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, seeded_init
from mmfm.tokenizers.image import transformer
from mmfm.tokenizers.metrics import chamfer, f_score
from mmfm.tokenizers.registry import register


@dataclass
class Shape3DConfig:
    num_points: int = 512
    out_points: int = 512
    width: int = 64
    depth: int = 2
    heads: int = 4
    num_queries: int = 16
    latent_dim: int = 16
    codebook_size: int = 256
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    fscore_threshold: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        if self.scales[-1] > self.num_queries:
            raise ValueError(f"scales: the largest scale {self.scales[-1]} exceeds num_queries {self.num_queries}")
        if self.out_points % self.num_queries:
            raise ValueError(f"out_points: {self.out_points} is not a multiple of num_queries {self.num_queries}")


@register("shape3d", Shape3DConfig)
class Shape3DTokenizer(NeuralTokenizer):
    modality = "shape3d"

    @seeded_init
    def __init__(self, config: Shape3DConfig):
        super().__init__(config)
        config.validate()
        c = config
        self.point_in = nn.Linear(6, c.width)
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
        self.encoder = transformer(c.width, c.depth, c.heads)
        self.to_latent = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.latent_dim))
        self.quantizer = MultiScaleResidualVQ(c.latent_dim, c.codebook_size, scales=c.scales, seed=c.seed)
        self.from_latent = nn.Linear(c.latent_dim, c.width)
        self.query_pos = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
        self.decoder = transformer(c.width, c.depth, c.heads)
        self.points_out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, 3 * c.out_points // c.num_queries))

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def tokens_per_sample(self) -> int:
        return sum(self.config.scales)

    @property
    def bytes_per_shape(self) -> float:
        return self.bits_per_sample / 8

    def prepare(self, sample) -> torch.Tensor:
        if isinstance(sample, dict):
            npz = sample.get("npz") or {}
            if "points" not in npz:
                raise ValueError(f"Shape3DTokenizer: sample {sample.get('__key__')!r} has no npz 'points'")
            pts = np.asarray(npz["points"], np.float32)
            nrm = np.asarray(npz.get("normals", np.zeros_like(pts)), np.float32)
            x = torch.from_numpy(np.concatenate([pts, nrm], 1) if pts.ndim == 2 and nrm.shape == pts.shape else pts)
        else:
            x = torch.as_tensor(sample).float()
        if x.dim() != 2 or x.shape[1] not in (3, 6):
            raise ValueError(f"Shape3DTokenizer: points must be [N, 3] or [N, 6] (xyz + normal), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("Shape3DTokenizer: the shape has zero points")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("Shape3DTokenizer: points contain NaN or infinite values")
        if x.shape[1] == 3:
            x = torch.cat([x, torch.zeros_like(x)], 1)
        idx = torch.linspace(0, x.shape[0] - 1, self.config.num_points).round().long()
        return x[idx].contiguous()

    def latents(self, x):
        if x.dim() != 3 or x.shape[2] != 6:
            raise ValueError(f"Shape3DTokenizer: batch must be [B, N, 6], got {tuple(x.shape)}")
        h = self.encoder(torch.cat([self.point_in(x), self.queries.expand(x.shape[0], -1, -1)], 1))
        return self.to_latent(h[:, x.shape[1]:])

    def decode_latents(self, z):
        h = self.decoder(self.from_latent(z) + self.query_pos)
        return self.points_out(h).reshape(z.shape[0], -1, 3)

    def forward(self, x) -> StepOutput:
        out = self.quantizer(self.latents(x))
        recon = self.decode_latents(out.quantized)
        cd = chamfer(recon, x[..., :3]).mean()
        return StepOutput(recon, cd + out.loss, {"chamfer": float(cd.detach()), "usage": float(out.metrics["usage"])})

    def encode_tensor(self, x):
        return torch.cat(self.quantizer.encode(self.latents(x)), 1)

    def decode_tensor(self, tokens):
        if tokens.shape[1] != self.tokens_per_sample:
            raise ValueError(f"Shape3DTokenizer.decode: expected {self.tokens_per_sample} tokens, got {tokens.shape[1]}")
        per_scale = list(tokens.split(self.config.scales, 1))
        return self.decode_latents(self.quantizer.decode(per_scale, self.config.num_queries))

    def metrics(self, x, recon) -> dict:
        return {"chamfer": float(chamfer(recon, x[..., :3]).mean()),
                "f_score": f_score(recon, x[..., :3], self.config.fscore_threshold),
                "bytes_per_shape": self.bytes_per_shape}

    def preview(self, x, recon):
        return [(render_points(a[:, :3]), render_points(b)) for a, b in zip(x, recon)]


def render_points(p: torch.Tensor, size: int = 64) -> torch.Tensor:
    """A grey [1, size, size] render: points projected on x-y, brighter = nearer (larger z)."""
    img = torch.zeros(size * size)
    p = p.detach().float()
    lo, hi = p.min(0).values, p.max(0).values
    q = (p - lo) / (hi - lo).clamp_min(1e-6)
    ij = (q[:, :2] * (size - 1)).round().long()
    flat = (size - 1 - ij[:, 1]) * size + ij[:, 0]
    img.scatter_reduce_(0, flat, 0.3 + 0.7 * q[:, 2], reduce="amax")
    return img.reshape(1, size, size)
