"""Video: a causal spatio-temporal tokenizer (first frame alone, then temporal patches), with a
learned-query option (LARP).

Patch tokens (num_queries = 0): frame 0 is cut into p x p patches on its own (so an image is a
one-frame video, as in C-ViViT / MAGVIT-v2); frames 1.. are cut into tubelets of
temporal_patch x p x p. A transformer with a block-causal mask (a token sees its own time step
and earlier ones) encodes them, FSQ quantizes every token, a causal transformer decodes.
Tokens: (1 + (frames - 1) / temporal_patch) * (size / p)^2, time-major.

Learned queries (num_queries = Q > 0, LARP, arXiv:2410.21264): Q holistic queries read all patch
tokens; their quantized outputs are the Q tokens, and the decoder reads them with one learned
mask token per patch position. Any Q; no causal order over time.

LARP's other two pieces (mmfm/tokenizers/larp.py): `quantizer: svq` (the stochastic VQ:
codebook_size l2-normalised codes of codebook_dim, indices drawn at svq_temperature in training),
and `prior_weight > 0`, a small causal transformer prior over the tokens trained jointly, its
next-token cross-entropy (x prior_weight) added to the reconstruction loss and backpropagated into
the encoder through the prior's straight-through quantized inputs. The prior is saved with the
tokenizer; it is not used to encode or decode.

Input: frames float [T, 3, S, S] in [0, 1]; a shard sample's uint8 frames are resized and cut to T,
and an encoded clip (.mp4, .webm, .mkv, .mov) is decoded by PyAV at `fps` (0: the clip's own rate),
seeking rather than decoding what it skips (mmfm.data.video.sample_frames).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.data.video import frames_of
from mmfm.quantizers import FSQ
from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, seeded_init
from mmfm.tokenizers.image import transformer
from mmfm.tokenizers.larp import ARPrior, StochasticVQ
from mmfm.tokenizers.metrics import psnr_per_sample
from mmfm.tokenizers.pixel_loss import check_recon_fields, reconstruction_loss
from mmfm.tokenizers.registry import register


@dataclass
class VideoConfig:
    frames: int = 9
    image_size: int = 32
    patch_size: int = 8
    temporal_patch: int = 4
    width: int = 64
    depth: int = 2
    heads: int = 4
    num_queries: int = 0              # 0: causal patch tokens; > 0: LARP learned holistic queries
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    fps: float = 0.0                  # frames per second taken from an encoded clip (mp4, ...); 0: its own rate
    seed: int = 0
    quantizer: str = "fsq"            # fsq (fsq_levels) or svq (LARP's stochastic VQ, the fields below)
    codebook_size: int = 1000         # svq: codes (fsq: the product of fsq_levels)
    codebook_dim: int = 16            # svq: size of a code (l2-normalised)
    svq_temperature: float = 0.03     # svq: training draws from softmax(cosine / temperature); 0: argmax
    svq_beta: float = 0.25            # svq: commitment weight
    svq_revive_after: int = 0         # svq: a code not drawn for this many training steps moves onto a batch latent (0: never)
    prior_weight: float = 0.0         # > 0: train LARP's AR prior jointly, this weight on its cross-entropy
    prior_width: int = 64
    prior_depth: int = 2
    prior_heads: int = 4
    # the pixel loss (mmfm/tokenizers/pixel_loss.py; the image tokenizer's fields): mse or l1, and the
    # weight on pixels far from the clip's median colour (the moving object's)
    recon_loss: str = "mse"
    object_weight: float = 0.0

    def validate(self) -> None:
        check_recon_fields(self.recon_loss, self.object_weight)
        if (self.frames - 1) % self.temporal_patch:
            raise ValueError(f"frames: frames - 1 = {self.frames - 1} must be a multiple of temporal_patch "
                             f"{self.temporal_patch} (first frame alone, then temporal patches)")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.num_queries < 0:
            raise ValueError(f"num_queries: must be >= 0 (0: patch tokens), got {self.num_queries}")
        if self.quantizer not in ("fsq", "svq"):
            raise ValueError(f"quantizer: expected 'fsq' or 'svq' (LARP's stochastic VQ), got {self.quantizer!r}")
        if self.quantizer == "svq":
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size: must be >= 2 for quantizer svq, got {self.codebook_size}")
            if self.codebook_dim < 1:
                raise ValueError(f"codebook_dim: must be >= 1, got {self.codebook_dim}")
            if not (self.svq_temperature >= 0 and math.isfinite(self.svq_temperature)):
                raise ValueError(f"svq_temperature: must be a finite number >= 0 (0: argmax), got {self.svq_temperature}")
            if not self.svq_beta >= 0:
                raise ValueError(f"svq_beta: must be >= 0, got {self.svq_beta}")
            if self.svq_revive_after < 0:
                raise ValueError(f"svq_revive_after: must be >= 0 (0: no revival), got {self.svq_revive_after}")
        if not (self.prior_weight >= 0 and math.isfinite(self.prior_weight)):
            raise ValueError(f"prior_weight: must be a finite number >= 0 (0: no prior), got {self.prior_weight}")
        if self.prior_weight > 0:
            if self.prior_depth < 1 or self.prior_width < 1 or self.prior_heads < 1:
                raise ValueError(f"prior_depth, prior_width, prior_heads: must be >= 1, got {self.prior_depth}, "
                                 f"{self.prior_width}, {self.prior_heads}")
            if self.prior_width % self.prior_heads:
                raise ValueError(f"prior_width: {self.prior_width} is not divisible by prior_heads {self.prior_heads}")


@register("video", VideoConfig)
class VideoTokenizer(NeuralTokenizer):
    modality = "video"

    @seeded_init
    def __init__(self, config: VideoConfig):
        super().__init__(config)
        config.validate()
        c = config
        self.g = c.image_size // c.patch_size
        self.steps = 1 + (c.frames - 1) // c.temporal_patch
        self.num_patches = self.steps * self.g ** 2
        d = c.codebook_dim if c.quantizer == "svq" else len(c.fsq_levels)
        first, tube = 3 * c.patch_size ** 2, 3 * c.temporal_patch * c.patch_size ** 2
        self.first_in, self.tube_in = nn.Linear(first, c.width), nn.Linear(tube, c.width)
        self.first_out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, first))
        self.tube_out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, tube))
        self.pos = nn.Parameter(torch.randn(self.num_patches, c.width) * 0.02)
        self.encoder = transformer(c.width, c.depth, c.heads)
        self.decoder = transformer(c.width, c.depth, c.heads)
        self.to_latent = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, d))
        self.from_latent = nn.Linear(d, c.width)
        if c.quantizer == "svq":
            self.quantizer = StochasticVQ(d, c.codebook_size, c.svq_temperature, c.svq_beta, c.seed,
                                          c.svq_revive_after)
        else:
            self.quantizer = FSQ(c.fsq_levels)
        if c.prior_weight > 0:
            self.prior = ARPrior(d, self.vocab_size, c.num_queries or self.num_patches, c.prior_width, c.prior_depth,
                                 c.prior_heads)
        if c.num_queries:
            self.queries = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
            self.query_pos = nn.Parameter(torch.randn(c.num_queries, c.width) * 0.02)
            self.mask_patch = nn.Parameter(torch.randn(self.num_patches, c.width) * 0.02)
        # block-causal: token i (time step t_i) may attend to j iff t_j <= t_i (True = masked out)
        t = torch.arange(self.steps).repeat_interleave(self.g ** 2)
        self.register_buffer("causal_mask", t[None, :] > t[:, None], persistent=False)

    @property
    def vocab_size(self) -> int:
        c = self.config
        return c.codebook_size if c.quantizer == "svq" else math.prod(c.fsq_levels)

    @property
    def tokens_per_sample(self) -> int:
        return self.config.num_queries or self.num_patches

    def prepare(self, sample) -> torch.Tensor:
        c = self.config
        if isinstance(sample, dict):
            # an encoded clip is decoded here, only as far as c.frames frames at c.fps, at the tokenizer's size
            arr = frames_of(sample, c.frames, c.fps or None, c.image_size, owner="VideoTokenizer")
            x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        else:
            x = torch.as_tensor(sample).float()
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VideoTokenizer: video must be [T, 3, H, W] (3 channels), got {tuple(x.shape)}")
        if x.shape[0] < c.frames:
            raise ValueError(f"VideoTokenizer: video has {x.shape[0]} frames, needs at least {c.frames}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("VideoTokenizer: video contains NaN or infinite values")
        x = x[:c.frames]
        if x.shape[-2:] != (c.image_size, c.image_size):
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return x.contiguous()

    # -- patches ---------------------------------------------------------------------------
    def _patchify(self, x):
        c, g, p, k = self.config, self.g, self.config.patch_size, self.config.temporal_patch
        b = x.shape[0]
        first = x[:, 0].reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        rest = x[:, 1:].reshape(b, (c.frames - 1) // k, k, 3, g, p, g, p)
        rest = rest.permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(b, -1, k * 3 * p * p)
        return first, rest

    def _unpatchify(self, first, rest):
        c, g, p, k = self.config, self.g, self.config.patch_size, self.config.temporal_patch
        b = first.shape[0]
        f0 = first.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 3, c.image_size, c.image_size)
        r = rest.reshape(b, (c.frames - 1) // k, g, g, k, 3, p, p).permute(0, 1, 4, 5, 2, 6, 3, 7)
        r = r.reshape(b, c.frames - 1, 3, c.image_size, c.image_size)
        return torch.cat([f0, r], 1)

    def _check(self, x):
        c = self.config
        if x.dim() != 5 or x.shape[1:] != (c.frames, 3, c.image_size, c.image_size):
            raise ValueError(f"VideoTokenizer: batch must be [B, {c.frames}, 3, {c.image_size}, {c.image_size}], "
                             f"got {tuple(x.shape)}")

    def latents(self, x):
        self._check(x)
        first, rest = self._patchify(x * 2 - 1)
        h = torch.cat([self.first_in(first), self.tube_in(rest)], 1) + self.pos
        if self.config.num_queries:
            h = self.encoder(torch.cat([h, self.queries.expand(x.shape[0], -1, -1)], 1))[:, self.num_patches:]
        else:
            h = self.encoder(h, mask=self.causal_mask)
        return self.to_latent(h)

    def decode_latents(self, z):
        h = self.from_latent(z)
        if self.config.num_queries:
            h = torch.cat([h + self.query_pos, self.mask_patch.expand(z.shape[0], -1, -1)], 1)
            h = self.decoder(h)[:, self.config.num_queries:]
        else:
            h = self.decoder(h + self.pos, mask=self.causal_mask)
        n0 = self.g ** 2
        return (self._unpatchify(self.first_out(h[:, :n0]), self.tube_out(h[:, n0:])) + 1) / 2

    def quantize(self, z):
        """(quantized latents straight-through, indices, quantizer loss, usage fraction)."""
        if self.config.quantizer == "svq":
            zq, idx, qloss = self.quantizer(z)
        else:
            out = self.quantizer(z)
            zq, idx, qloss = out.quantized, out.indices, out.loss
        usage = torch.unique(idx).numel() / self.vocab_size
        return zq, idx, qloss, usage

    def forward(self, x) -> StepOutput:
        zq, idx, qloss, usage = self.quantize(self.latents(x))
        recon = self.decode_latents(zq)
        mse = F.mse_loss(recon.detach(), x)
        metrics = {"recon_mse": float(mse), "usage": usage}
        if self.config.quantizer == "svq" and self.config.svq_revive_after > 0:
            metrics["revived"] = float(self.quantizer.revived)
        loss = reconstruction_loss(recon, x, self.config.recon_loss, self.config.object_weight) + qloss
        if self.config.prior_weight > 0:
            ce = self.prior.loss(zq, idx)
            loss = loss + self.config.prior_weight * ce
            metrics["prior_bits_per_token"] = float(ce.detach()) / math.log(2)
        return StepOutput(recon, loss, metrics)

    @torch.no_grad()
    def prior_bits_per_token(self, x) -> float:
        """The jointly trained prior's mean next-token loss (bits per token) on the argmax tokens of x."""
        if self.config.prior_weight <= 0:
            raise ValueError("VideoTokenizer.prior_bits_per_token: this tokenizer has no prior (prior_weight is 0)")
        was = self.training
        self.eval()
        try:
            idx = self.encode_tensor(x)
            ce = self.prior.loss(self.quantizer.decode(idx).to(x.dtype), idx)
        finally:
            self.train(was)
        return float(ce) / math.log(2)

    def encode_tensor(self, x):
        return self.quantizer.encode(self.latents(x))

    def decode_tensor(self, tokens):
        if tokens.shape[1] != self.tokens_per_sample:
            raise ValueError(f"VideoTokenizer.decode: expected {self.tokens_per_sample} tokens, got {tokens.shape[1]}")
        return self.decode_latents(self.quantizer.decode(tokens)).clamp(0, 1)

    def metrics(self, x, recon) -> dict:
        per_frame = [float(psnr_per_sample(x[:, t], recon[:, t].clamp(0, 1)).mean()) for t in range(x.shape[1])]
        return {"psnr": sum(per_frame) / len(per_frame), "psnr_first_frame": per_frame[0],
                "psnr_last_frame": per_frame[-1], "psnr_per_frame": [round(v, 2) for v in per_frame]}

    def preview(self, x, recon):
        return [(torch.cat(list(a), 2), torch.cat(list(b.clamp(0, 1)), 2)) for a, b in zip(x, recon)]
