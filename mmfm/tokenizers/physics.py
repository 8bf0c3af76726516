"""Physics: fields [T, C, H, W] -> per-frame conv autoencoder with FSQ -> refinement (PhysiX).

Each frame is normalised per channel with statistics fitted on the training set (buffers, saved
with the tokenizer), encoded by the conv encoder of image_conv to an (H / 2^d)^2 grid and
quantized with FSQ. The refinement module (PhysiX, arXiv:2506.17774) is a small residual conv
net applied to the decoded field: it learns to correct what quantization rounding loses. It
trains on the decoder's output detached, so it corrects the decoder without changing it, and its
last layer starts at zero (at step 0 it is the identity). Training has two stages: both parts
together, then (`refine_steps`) the refinement alone on the frozen decoder, so that it learns the
rounding error of the final decoder rather than chasing a moving one. Metric: relative L2 error before and
after refinement; refinement must lower it.

Tokens: frames x (H / 2^d)^2, frame-major. Only 2D fields with `channels` channels on a
`grid` x `grid` mesh are taken (the 1D Burgers runs of the demo corpus are other data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.quantizers import FSQ
from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, seeded_init
from mmfm.tokenizers.image import conv_decoder, conv_encoder
from mmfm.tokenizers.metrics import rel_l2
from mmfm.tokenizers.registry import register


@dataclass
class PhysicsConfig:
    grid: int = 64
    channels: int = 1
    frames: int = 16
    frame_stride: int = 1            # take every k-th saved frame: the tokens span (frames - 1) * k steps of the run
    width: int = 16
    downsamples: int = 3
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    refine_width: int = 32
    refine_steps: int = 200          # stage 2: refinement alone on the frozen autoencoder
    patch: int = 1                   # pixel-unshuffle factor before the encoder (1 = none)
    loss: str = "mse"                # mse (normalised fields) or rel (relative L2, the eval metric)
    augment_roll: bool = False       # training only: roll each trajectory by a random (dy, dx); periodic fields only
    seed: int = 0

    def validate(self) -> None:
        if self.patch < 1 or self.grid % self.patch:
            raise ValueError(f"patch: {self.patch} must be >= 1 and divide grid {self.grid}")
        if (self.grid // self.patch) % (2 ** self.downsamples):
            raise ValueError(f"grid: {self.grid} / patch {self.patch} is not divisible by "
                             f"2^downsamples = {2 ** self.downsamples}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride: must be >= 1, got {self.frame_stride}")
        if self.loss not in ("mse", "rel"):
            raise ValueError(f"loss: must be 'mse' or 'rel', got {self.loss!r}")


@register("physics", PhysicsConfig)
class PhysicsTokenizer(NeuralTokenizer):
    modality = "physics"

    @seeded_init
    def __init__(self, config: PhysicsConfig):
        super().__init__(config)
        config.validate()
        c = config
        d = len(c.fsq_levels)
        cp = c.channels * c.patch ** 2
        self.encoder = conv_encoder(cp, c.width, c.downsamples, d)
        self.decoder = conv_decoder(cp, c.width, c.downsamples, d)
        self.quantizer = FSQ(c.fsq_levels)
        w = c.refine_width
        self.refine = nn.Sequential(nn.Conv2d(c.channels, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1),
                                    nn.GELU(), nn.Conv2d(w, c.channels, 3, padding=1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.register_buffer("mean", torch.zeros(c.channels))
        self.register_buffer("std", torch.ones(c.channels))
        self.latent_grid = c.grid // c.patch // 2 ** c.downsamples
        self._roll_gen = torch.Generator().manual_seed(c.seed)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.config.fsq_levels)

    @property
    def tokens_per_sample(self) -> int:
        return self.config.frames * self.latent_grid ** 2

    def prepare(self, sample) -> torch.Tensor:
        c = self.config
        if isinstance(sample, dict):
            npz = sample.get("npz") or {}
            if "fields" not in npz:
                raise ValueError(f"PhysicsTokenizer: sample {sample.get('__key__')!r} has no npz 'fields'")
            x = torch.from_numpy(np.asarray(npz["fields"], dtype=np.float32))
        else:
            x = torch.as_tensor(sample).float()
        want = (c.frames, c.channels, c.grid, c.grid)
        if x.dim() != 4 or x.shape[1] != c.channels:
            raise ValueError(f"PhysicsTokenizer: field must be [T, {c.channels}, {c.grid}, {c.grid}] "
                             f"({c.channels} channels), got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("PhysicsTokenizer: field contains NaN or infinite values")
        if x.shape[0] == c.frames and x.shape[2:] == want[2:]:
            return x.contiguous()    # already prepared (prepare is idempotent, as the training data path needs)
        need = (c.frames - 1) * c.frame_stride + 1
        if x.shape[0] < need:
            raise ValueError(f"PhysicsTokenizer: field must be [T >= {need}, {c.channels}, {c.grid}, {c.grid}] "
                             f"({c.frames} frames at stride {c.frame_stride}), got shape {tuple(x.shape)}")
        x = x[:need:c.frame_stride]
        if x.shape[2:] != want[2:]:
            # another grid (a PDEBench 128^2 run for a 64^2 tokenizer): resampled, antialiased when coarsened
            x = F.interpolate(x, size=want[2:], mode="bilinear", align_corners=False,
                              antialias=bool(x.shape[2] > c.grid or x.shape[3] > c.grid))
        return x.contiguous()

    def refinement_parameters(self):
        """Stage 2 of training: the refinement alone, on the frozen decoder (see `mmfm tokenizer train`)."""
        return self.refine.parameters()

    def fit_data(self, train: torch.Tensor) -> None:
        """Per-channel mean and std over the training trajectories [N, T, C, H, W]."""
        self.mean.copy_(train.mean((0, 1, 3, 4)))
        self.std.copy_(train.std((0, 1, 3, 4)).clamp_min(1e-6))

    def _frames(self, x):
        c = self.config
        if x.dim() != 5 or x.shape[1:] != (c.frames, c.channels, c.grid, c.grid):
            raise ValueError(f"PhysicsTokenizer: batch must be [B, {c.frames}, {c.channels}, {c.grid}, {c.grid}], "
                             f"got {tuple(x.shape)}")
        f = x.reshape(-1, c.channels, c.grid, c.grid)
        return (f - self.mean[:, None, None]) / self.std[:, None, None]

    def _unframe(self, f, b):
        c = self.config
        f = f * self.std[:, None, None] + self.mean[:, None, None]
        return f.reshape(b, c.frames, c.channels, c.grid, c.grid)

    def _encode(self, f):
        """Normalised frames [N, C, H, W] -> latents [N, h, w, d]. Smooth fields lose nothing to the
        pixel unshuffle, and it spares the encoder its costliest, full-resolution stage."""
        return self.encoder(F.pixel_unshuffle(f, self.config.patch)).permute(0, 2, 3, 1)

    def _decode(self, q):
        return F.pixel_shuffle(self.decoder(q.permute(0, 3, 1, 2)), self.config.patch)

    def _decode_norm(self, q):
        coarse = self._decode(q)
        return coarse, coarse + self.refine(coarse)

    def _roll(self, x):
        """A periodic domain has no preferred origin: each trajectory shifted whole by a random
        (dy, dx) is another valid one. The demo corpus has 6 training runs; the autoencoder
        overfits them (train rel L2 0.09, held-out 0.25) without this."""
        g = self.config.grid
        shifts = torch.randint(g, (x.shape[0], 2), generator=self._roll_gen)
        return torch.stack([torch.roll(t, (int(a), int(b)), (-2, -1)) for t, (a, b) in zip(x, shifts)])

    def forward(self, x) -> StepOutput:
        if self.training and self.config.augment_roll:
            x = self._roll(x)
        f = self._frames(x)
        out = self.quantizer(self._encode(f))
        coarse = self._decode(out.quantized)
        refined = coarse.detach() + self.refine(coarse.detach())
        loss = self._loss(coarse, f, x) + self._loss(refined, f, x)
        metrics = {"usage": float(out.metrics["usage"]), "mse_coarse": float(F.mse_loss(coarse, f).detach()),
                   "mse_refined": float(F.mse_loss(refined, f).detach())}
        return StepOutput(self._unframe(refined, x.shape[0]), loss, metrics)

    def _loss(self, y, f, x):
        if self.config.loss == "mse":
            return F.mse_loss(y, f)
        # squared relative L2 per trajectory, in physical units: what eval reports, so a run with
        # a small amplitude counts as much as a large one (plain MSE lets it drown)
        b = x.shape[0]
        err = (self._unframe(y, b) - x).flatten(1).pow(2).sum(1)
        return (err / x.flatten(1).pow(2).sum(1).clamp_min(1e-12)).mean()

    def encode_tensor(self, x):
        f = self._frames(x)
        return self.quantizer.encode(self._encode(f)).reshape(x.shape[0], -1)

    def _codes(self, tokens):
        if tokens.shape[1] != self.tokens_per_sample:
            raise ValueError(f"PhysicsTokenizer.decode: expected {self.tokens_per_sample} tokens, got {tokens.shape[1]}")
        g = self.latent_grid
        return self.quantizer.decode(tokens.reshape(-1, g, g))

    def decode_tensor(self, tokens, refine: bool = True):
        coarse, refined = self._decode_norm(self._codes(tokens))
        return self._unframe(refined if refine else coarse, tokens.shape[0])

    @torch.no_grad()
    def metrics(self, x, recon=None) -> dict:
        tokens = self.encode_tensor(x)
        before = self.decode_tensor(tokens, refine=False)
        after = self.decode_tensor(tokens, refine=True)
        return {"rel_l2": rel_l2(x, after), "rel_l2_before_refine": rel_l2(x, before)}

    def preview(self, x, recon):
        from mmfm.tokenizers.render import normalise

        pairs = []
        for a, b in zip(x, recon):
            lo, hi = float(a[:, 0].min()), float(a[:, 0].max())
            row = lambda v: torch.cat(list(normalise(v[::4, 0], lo, hi)), 1)  # noqa: E731  every 4th frame
            pairs.append((row(a)[None], row(b)[None]))
        return pairs
