"""Image tokenizers.

image_conv: a 2D convolutional autoencoder (VQGAN-like shape, without the GAN): stride-2 conv
    stages down to a latent grid, quantized per position with VQ, FSQ or LFQ (config
    `quantizer`), decoded by the mirror image. Tokens: the latent grid in raster order,
    (image_size / 2^downsamples)^2 per image. `quantizer: none` gives the continuous
    autoencoder that the TokenBridge path (mmfm.tokenizers.tokenbridge) discretises.

image_1d: a 1D tokenizer in the TiTok manner (Yu et al. 2024, arXiv:2406.07550): a ViT encoder
    over patches together with K learned latent queries; the queries' outputs, quantized, are
    the K tokens. The decoder reads the tokens plus one learned mask token per patch and
    predicts the patches. Tail-token drop / nested dropout (One-D-Piece, FlexTok): in training
    each image keeps only its first k ~ U{1..K} tokens, the rest replaced by a learned
    "dropped" embedding, so information concentrates at the head and any prefix decodes.
    Adaptive length (`length_head`, KARL-style; mmfm/tokenizers/length_head.py): a small head reads
    the encoder's output once and predicts the image's PSNR after each prefix, hence how many tokens
    reach a target PSNR; `encode(..., target_psnr=X)` (or `target_psnr` in the config) then returns
    only those tokens, a variable-length sequence that the unified vocabulary closes with <end_image>.

Both take images as float [3, S, S] in [0, 1]; `prepare` turns a shard sample (uint8 PNG, grey or
RGB) into that, resizing with bicubic filtering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, check_finite, seeded_init
from mmfm.tokenizers.metrics import psnr, ssim
from mmfm.tokenizers.quantizer_choice import check_quantizer_fields, codebook_size_of, make_quantizer
from mmfm.tokenizers.pixel_loss import check_recon_fields, reconstruction_loss
from mmfm.tokenizers.registry import register
from mmfm.tokenizers.robust import LatentPerturbation, check_perturbation_fields


def image_to_tensor(sample, size: int, owner: str) -> torch.Tensor:
    """A shard sample (dict with 'png'/'jpg'/'jpeg'/'webp'), a uint8 array [H, W(, C)] or a float tensor
    [3, H, W] in [0, 1] -> float [3, size, size]. Grey images are repeated to RGB, RGBA is composed
    over white; anything else is an error."""
    if isinstance(sample, torch.Tensor):
        if sample.dim() != 3 or sample.shape[0] != 3:
            raise ValueError(f"{owner}: image tensor must have shape [3, H, W] (3 channels), got {tuple(sample.shape)}")
        check_finite(sample, owner, "the image tensor")
        x = sample.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        return x
    if isinstance(sample, dict):
        arr = next((sample[f] for f in ("png", "jpg", "jpeg", "webp") if f in sample), None)
        if arr is None:
            raise ValueError(f"{owner}: sample {sample.get('__key__')!r} has no 'png', 'jpg', 'jpeg' or 'webp' field")
    else:
        arr = sample
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        # RGBA (a PNG or WebP with transparency, a palette image with a transparent colour): over white
        alpha = arr[:, :, 3:].astype(np.float32) / 255.0
        arr = np.round(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{owner}: image must be grey [H, W] or RGB [H, W, 3], got shape {arr.shape} "
                         f"({arr.shape[-1] if arr.ndim == 3 else '?'} channels)")
    if arr.dtype != np.uint8:
        raise ValueError(f"{owner}: image array must be uint8, got {arr.dtype}")
    from PIL import Image

    if arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float() / 255.0


def image_metrics(x: torch.Tensor, recon: torch.Tensor) -> dict:
    r = recon.clamp(0, 1)
    return {"psnr": psnr(x, r), "ssim": ssim(x, r)}


# ---------------------------------------------------------------------------------------- conv
NORMS = ("group", "channel")
PADDINGS = ("zeros", "replicate")


@dataclass
class ImageConvConfig:
    image_size: int = 32
    channels: int = 32              # width of the first stage; doubles per downsample
    downsamples: int = 2            # latent grid = image_size / 2^downsamples
    quantizer: str = "vq"           # vq, fsq, lfq or none
    latent_dim: int = 8
    codebook_size: int = 256        # vq only
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    # group: GroupNorm, zeros: zero padding (the VQGAN habit, and every tokenizer saved before these
    # fields). channel + replicate: a local encoder, so a flat region gets one token wherever it is
    # and whatever else the image holds; the AR model then learns far fewer background tokens
    # (docs/training.md, "Fourth round").
    norm: str = "group"             # group or channel
    padding: str = "zeros"          # zeros or replicate
    # the pixel loss (mmfm/tokenizers/pixel_loss.py): mse (every tokenizer saved before these fields)
    # or l1 (VQGAN's pixel term); object_weight w > 0 weighs each pixel far from the image's median
    # colour 1 + w times, so a small object keeps its colour instead of fading into its background
    recon_loss: str = "mse"         # mse or l1
    object_weight: float = 0.0
    # latent perturbation in training (RobustTok; mmfm/tokenizers/robust.py): each token's code is
    # replaced with probability perturb_rate by one of its perturb_neighbours nearest codes (0 = any
    # other code), on a share perturb_images of each batch's images. Off at eval and by default.
    perturb_rate: float = 0.0
    perturb_neighbours: int = 0
    perturb_images: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        check_quantizer_fields(self.quantizer, self.latent_dim, self.codebook_size, self.fsq_levels)
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: expected one of {', '.join(PADDINGS)}, got {self.padding!r}")
        check_recon_fields(self.recon_loss, self.object_weight)
        vocab = (None if self.quantizer == "none"
                 else codebook_size_of(self.quantizer, self.latent_dim, self.codebook_size, self.fsq_levels))
        check_perturbation_fields(self.perturb_rate, self.perturb_neighbours, self.perturb_images, vocab,
                                  self.quantizer)
        if self.image_size % (2 ** self.downsamples):
            raise ValueError(f"image_size: {self.image_size} is not divisible by 2^downsamples = {2 ** self.downsamples}")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel on its own. GroupNorm's statistics span the whole
    image, so a flat patch of background gets a different latent (and token) depending on what else
    is in the image; with a per-pixel norm (and replicate padding) the encoder is local and
    translation-equivariant: one background colour is one token wherever it is."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(c: int, kind: str) -> nn.Module:
    return nn.GroupNorm(8, c) if kind == "group" else ChannelNorm(c)


def _res_block(c: int, norm: str = "group", padding: str = "zeros") -> nn.Module:
    return nn.Sequential(_norm(c, norm), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1, padding_mode=padding),
                         _norm(c, norm), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1, padding_mode=padding))


class _Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def conv_encoder(in_ch: int, width: int, downsamples: int, out_dim: int, norm: str = "group",
                 padding: str = "zeros") -> nn.Module:
    layers, c = [nn.Conv2d(in_ch, width, 3, padding=1, padding_mode=padding)], width
    for _ in range(downsamples):
        layers += [_Residual(_res_block(c, norm, padding)), nn.Conv2d(c, c * 2, 4, stride=2, padding=1,
                                                                      padding_mode=padding)]
        c *= 2
    layers += [_Residual(_res_block(c, norm, padding)), _norm(c, norm), nn.SiLU(), nn.Conv2d(c, out_dim, 1)]
    return nn.Sequential(*layers)


def conv_decoder(out_ch: int, width: int, downsamples: int, in_dim: int, norm: str = "group",
                 padding: str = "zeros") -> nn.Module:
    # the transposed convolutions keep zero padding (torch has no other mode for them)
    c = width * 2 ** downsamples
    layers = [nn.Conv2d(in_dim, c, 3, padding=1, padding_mode=padding), _Residual(_res_block(c, norm, padding))]
    for _ in range(downsamples):
        layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), _Residual(_res_block(c // 2, norm, padding))]
        c //= 2
    layers += [_norm(c, norm), nn.SiLU(), nn.Conv2d(c, out_ch, 3, padding=1, padding_mode=padding)]
    return nn.Sequential(*layers)


@register("image_conv", ImageConvConfig)
class ImageConvTokenizer(NeuralTokenizer):
    modality = "image"

    @seeded_init
    def __init__(self, config: ImageConvConfig):
        super().__init__(config)
        config.validate()
        c = config
        self.encoder = conv_encoder(3, c.channels, c.downsamples, c.latent_dim, c.norm, c.padding)
        self.decoder = conv_decoder(3, c.channels, c.downsamples, c.latent_dim, c.norm, c.padding)
        self.quantizer = make_quantizer(c.quantizer, c.latent_dim, c.codebook_size, c.fsq_levels, c.seed)
        self.grid = c.image_size // 2 ** c.downsamples
        self.perturbation = (LatentPerturbation(c.perturb_rate, c.perturb_neighbours, c.perturb_images,
                                                self.vocab_size, c.seed) if c.perturb_rate > 0 else None)
        if self.perturbation is not None:   # an attribute of a module, so the Trainer saves its state
            self._perturb_gen = self.perturbation.generator

    @property
    def vocab_size(self) -> int:
        c = self.config
        return codebook_size_of(c.quantizer, c.latent_dim, c.codebook_size, c.fsq_levels)

    @property
    def tokens_per_sample(self) -> int:
        return self.grid * self.grid

    def prepare(self, sample) -> torch.Tensor:
        return image_to_tensor(sample, self.config.image_size, type(self).__name__)

    def _check_batch(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.dim() != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"{type(self).__name__}: images must be [B, 3, {s}, {s}], got {tuple(x.shape)}")

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents [B, h, w, latent_dim] (before quantization)."""
        self._check_batch(x)
        return self.encoder(x * 2 - 1).permute(0, 2, 3, 1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z.permute(0, 3, 1, 2)) + 1) / 2

    def forward(self, x: torch.Tensor) -> StepOutput:
        z = self.latents(x)
        if self.quantizer is None:
            q, qloss, metrics = z, z.new_zeros(()), {}
        else:
            out = self.quantizer(z)
            q, qloss, metrics = out.quantized, out.loss, {k: float(v) for k, v in out.metrics.items()}
            if self.training and self.perturbation is not None:
                q, metrics["perturbed"] = self.perturbation.perturb(self.quantizer, z, q, out.indices)
        recon = self.decode_latents(q)
        rec = reconstruction_loss(recon, x, self.config.recon_loss, self.config.object_weight)
        metrics["recon_mse"] = float(F.mse_loss(recon.detach(), x))
        return StepOutput(recon, rec + qloss, metrics)

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            raise ValueError("ImageConvTokenizer: quantizer is 'none' (continuous); tokenize it with "
                             "mmfm.tokenizers.tokenbridge")
        return self.quantizer.encode(self.latents(x)).reshape(x.shape[0], -1)

    def decode_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.tokens_per_sample:
            raise ValueError(f"ImageConvTokenizer.decode: expected {self.tokens_per_sample} tokens per image, "
                             f"got {tokens.shape[1]}")
        z = self.quantizer.decode(tokens.reshape(-1, self.grid, self.grid))
        return self.decode_latents(z).clamp(0, 1)

    def metrics(self, x, recon) -> dict:
        return image_metrics(x, recon)


# ---------------------------------------------------------------------------------------- 1D
@dataclass
class Image1DConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    depth: int = 2                  # transformer layers in the encoder and in the decoder
    heads: int = 4
    num_tokens: int = 32            # K learned latent queries = tokens per image
    quantizer: str = "fsq"          # vq, fsq or lfq
    latent_dim: int = 4
    codebook_size: int = 1024
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    nested_dropout: bool = True     # train with tail-token drop so any prefix decodes
    token_mixing: bool = False      # add a learned linear patch <-> token path (see Image1DTokenizer)
    seed: int = 0
    # adaptive length (mmfm/tokenizers/length_head.py), fitted after training on the training images
    length_head: bool = False       # predict each image's PSNR after every prefix, hence the tokens it needs
    length_head_width: int = 256
    length_head_steps: int = 6000
    # weight of the per-token increments (curve[k] - curve[k-1]) in the head's loss beside the curve itself:
    # the slope rule (slope_lengths) reads only the differences, and a head fitted to the curve alone
    # saved no bits with it on held-out images (docs/benchmarks.md, "Adaptive length", session 11)
    length_head_slope_weight: float = 8.0
    length_coverage: float = 0.9    # share of reachable (image, target) pairs the predicted length must reach
    length_calib_fraction: float = 0.25   # training images held back from the head's fit to calibrate its margin
    target_psnr: float = 0.0        # > 0: encode() keeps the tokens predicted for this PSNR (0: all num_tokens)
    # > 0: also stop where the image's predicted curve is within this many dB of its own ceiling, so an image
    # that cannot reach the target does not get every token (docs/benchmarks.md: what it saves, what it misses)
    length_saturation_db: float = 0.0

    def validate(self) -> None:
        if self.quantizer == "none":
            raise ValueError("quantizer: image_1d needs a quantizer (vq, fsq or lfq)")
        if self.length_head and not self.nested_dropout:
            raise ValueError("length_head: needs nested_dropout: true (a shorter sequence only decodes when "
                             "training made every prefix decode)")
        if self.length_saturation_db < 0:
            raise ValueError(f"length_saturation_db: expected dB >= 0 (0: off), got {self.length_saturation_db}")
        if self.target_psnr < 0:
            raise ValueError(f"target_psnr: expected a PSNR in dB > 0, or 0 for fixed length; got {self.target_psnr}")
        if self.target_psnr > 0 and not self.length_head:
            raise ValueError("target_psnr: adaptive length needs length_head: true (the head predicts the length)")
        if not 0 < self.length_coverage < 1:
            raise ValueError(f"length_coverage: expected a share in (0, 1), got {self.length_coverage}")
        if not 0 < self.length_calib_fraction < 1:
            raise ValueError(f"length_calib_fraction: expected a share in (0, 1), got {self.length_calib_fraction}")
        if not self.length_head_slope_weight >= 0:
            raise ValueError(f"length_head_slope_weight: expected a weight >= 0 (0: the curve alone), got "
                             f"{self.length_head_slope_weight}")
        if self.length_head_steps < 1 or self.length_head_width < 1:
            raise ValueError(f"length_head_steps, length_head_width: expected >= 1, got {self.length_head_steps}, "
                             f"{self.length_head_width}")
        check_quantizer_fields(self.quantizer, self.latent_dim, self.codebook_size, self.fsq_levels)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")


def transformer(width: int, depth: int, heads: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


@register("image_1d", Image1DConfig)
class Image1DTokenizer(NeuralTokenizer):
    modality = "image"

    @seeded_init
    def __init__(self, config: Image1DConfig):
        super().__init__(config)
        config.validate()
        c = config
        self.num_patches = (c.image_size // c.patch_size) ** 2
        pdim = 3 * c.patch_size ** 2
        self.patch_in = nn.Linear(pdim, c.width)
        self.patch_pos = nn.Parameter(torch.randn(self.num_patches, c.width) * 0.02)
        self.queries = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.encoder = transformer(c.width, c.depth, c.heads)
        self.to_latent = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.latent_dim))
        self.quantizer = make_quantizer(c.quantizer, c.latent_dim, c.codebook_size, c.fsq_levels, c.seed)
        self.from_latent = nn.Linear(c.latent_dim, c.width)
        self.token_pos = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.dropped = nn.Parameter(torch.zeros(c.width))      # stands in for every token not kept
        self.mask_patch = nn.Parameter(torch.randn(self.num_patches, c.width) * 0.02)
        self.decoder = transformer(c.width, c.depth, c.heads)
        self.patch_out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, pdim))
        if c.token_mixing:
            # Attention starts uniform, so at first every query sees the mean of all patches, spatial
            # detail averages away, and the latents vary with the query far more than with the image
            # (measured: 5x); thousands of steps pass before attention sharpens. A learned linear map
            # from patches to queries (and from tokens to patches in the decoder), as in MLP-Mixer's
            # token mixing, gives each token position-specific access from step 0.
            self.enc_mix = nn.Parameter(torch.randn(c.num_tokens, self.num_patches) / self.num_patches ** 0.5)
            self.dec_mix = nn.Parameter(torch.randn(self.num_patches, c.num_tokens) / c.num_tokens ** 0.5)
        self._drop_gen = torch.Generator().manual_seed(c.seed)
        if c.length_head:
            from mmfm.tokenizers.length_head import LengthHead

            self.length_head = LengthHead(c.num_tokens, c.latent_dim, c.length_head_width)
            # NaN until fit_length_head calibrates it: a saved tokenizer carries it in its weights
            self.register_buffer("length_margin", torch.tensor(float("nan")))

    @property
    def vocab_size(self) -> int:
        c = self.config
        return codebook_size_of(c.quantizer, c.latent_dim, c.codebook_size, c.fsq_levels)

    @property
    def tokens_per_sample(self) -> int:
        """The most tokens an image gets (all of them unless target_psnr asks for fewer)."""
        return self.config.num_tokens

    tokens_rule = ("num_tokens per image, or with target_psnr the length head's 1..num_tokens; "
                   "any prefix of them (1..num_tokens) decodes")

    def prepare(self, sample) -> torch.Tensor:
        return image_to_tensor(sample, self.config.image_size, type(self).__name__)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        s, p = self.config.image_size, self.config.patch_size
        if x.dim() != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"Image1DTokenizer: images must be [B, 3, {s}, {s}], got {tuple(x.shape)}")
        b, g = x.shape[0], s // p
        return x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        s, p = self.config.image_size, self.config.patch_size
        b, g = patches.shape[0], s // p
        return patches.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, s, s)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_in(self._patchify(x) * 2 - 1) + self.patch_pos
        q = self.queries.expand(x.shape[0], -1, -1)
        if self.config.token_mixing:
            q = q + torch.einsum("kp,bpd->bkd", self.enc_mix, h)
        out = self.encoder(torch.cat([h, q], 1))
        return self.to_latent(out[:, self.num_patches:])  # [B, K, latent_dim]

    def decode_latents(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, k0, latent_dim] with k0 <= K; keep [B] (optional) keeps only each row's first keep[b]."""
        b, k0 = z.shape[:2]
        k_all = self.config.num_tokens
        t = self.from_latent(z)
        if k0 < k_all:
            t = torch.cat([t, self.dropped.expand(b, k_all - k0, -1)], 1)
        if keep is not None:
            kept = torch.arange(k_all, device=z.device)[None] < keep[:, None]
            t = torch.where(kept[..., None], t, self.dropped.expand_as(t))
        t = t + self.token_pos
        patches = self.mask_patch.expand(b, -1, -1)
        if self.config.token_mixing:
            patches = patches + torch.einsum("pk,bkd->bpd", self.dec_mix, t)
        out = self.decoder(torch.cat([t, patches], 1))
        return (self._unpatchify(self.patch_out(out[:, k_all:])) + 1) / 2

    def forward(self, x: torch.Tensor) -> StepOutput:
        qout = self.quantizer(self.latents(x))
        keep = None
        if self.training and self.config.nested_dropout:
            keep = torch.randint(1, self.config.num_tokens + 1, (x.shape[0],), generator=self._drop_gen).to(x.device)
        recon = self.decode_latents(qout.quantized, keep)
        rec = F.mse_loss(recon, x)
        metrics = {k: float(v) for k, v in qout.metrics.items()}
        metrics["recon_mse"] = float(rec.detach())
        return StepOutput(recon, rec + qout.loss, metrics)

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.latents(x))

    def decode_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, k] for any 1 <= k <= num_tokens: a prefix decodes (the rest count as dropped)."""
        if not 1 <= tokens.shape[1] <= self.config.num_tokens:
            raise ValueError(f"Image1DTokenizer.decode: expected 1..{self.config.num_tokens} tokens per image, "
                             f"got {tokens.shape[1]}")
        return self.decode_latents(self.quantizer.decode(tokens)).clamp(0, 1)

    # -- adaptive length -------------------------------------------------------------------
    def after_training(self, train: torch.Tensor) -> None:
        if self.config.length_head:
            from mmfm.tokenizers.length_head import fit_length_head

            self.length_fit = fit_length_head(self, train)

    def _check_head(self) -> None:
        if not self.config.length_head:
            raise ValueError("Image1DTokenizer: adaptive length needs a length head (config length_head: true)")
        if math.isnan(float(self.length_margin)):
            raise ValueError("Image1DTokenizer: the length head is not fitted (mmfm tokenizer train fits it after "
                             "training; or mmfm tokenizer length-head --config ...)")

    @torch.no_grad()
    def predicted_curves(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """The head's PSNR after each prefix k = 1..K of each image x [B, 3, S, S]: [B, K], non-decreasing in k."""
        self._check_head()
        was = self.training
        self.eval()
        try:
            return torch.cat([self.length_head(self.latents(b)) for b in x.split(batch)])
        finally:
            self.train(was)

    def predict_lengths(self, x: torch.Tensor, target_psnr, saturation_db: float | None = None) -> torch.Tensor:
        """Tokens [B] each image needs to reach target_psnr (dB: a number, or one per image), from one
        encoder pass; num_tokens where the head expects no prefix to reach it. saturation_db (default: the
        config's length_saturation_db; 0 = off) also stops where the predicted curve is that close to its end."""
        from mmfm.tokenizers.length_head import lengths_from_curves, saturated_lengths

        t = torch.as_tensor(target_psnr, dtype=torch.float32).reshape(-1)
        if not bool(torch.isfinite(t).all()) or t.numel() not in (1, x.shape[0]):
            raise ValueError(f"Image1DTokenizer: target_psnr must be a finite dB value or one per image "
                             f"({x.shape[0]}), got {target_psnr!r}")
        pred = self.predicted_curves(x)
        targets = t.to(pred.device).expand(x.shape[0])[:, None]
        lengths = lengths_from_curves(pred - float(self.length_margin), targets)[:, 0]
        sat = self.config.length_saturation_db if saturation_db is None else saturation_db
        return torch.minimum(lengths, saturated_lengths(pred, sat)) if sat > 0 else lengths

    def lengths_at_slope(self, x: torch.Tensor, db_per_token: float) -> torch.Tensor:
        """Tokens [B] where each image's predicted curve gains less than db_per_token dB per further token
        (length_head.slope_lengths): the allocation for the least mean bits at a mean PSNR."""
        from mmfm.tokenizers.length_head import slope_lengths

        return slope_lengths(self.predicted_curves(x), db_per_token)

    def _target(self, target_psnr):
        return self.config.target_psnr if target_psnr is None else target_psnr

    @torch.no_grad()
    def encode(self, sample, target_psnr: float | None = None) -> torch.Tensor:
        """Tokens of one image [k]: all num_tokens, or with a target PSNR (argument, else the config's
        target_psnr when > 0) the first k the length head predicts for it."""
        t = self._target(target_psnr)
        if not t:
            return super().encode(sample)
        return self.encode_adaptive(self._as_batch(sample), t)[0]

    @torch.no_grad()
    def encode_batch(self, samples, target_psnr: float | None = None):
        """[B, num_tokens] at fixed length; with a target PSNR a list of B sequences of their own lengths."""
        t = self._target(target_psnr)
        if not t:
            return super().encode_batch(samples)
        x = torch.stack([self.prepare(s) for s in samples]).to(self.device)
        return self.encode_adaptive(x, t)

    @torch.no_grad()
    def encode_adaptive(self, x: torch.Tensor, target_psnr) -> list[torch.Tensor]:
        was = self.training
        self.eval()
        try:
            tokens = self.encode_tensor(x)
            lengths = self.predict_lengths(x, target_psnr).tolist()
            return [row[:k] for row, k in zip(tokens, lengths)]
        finally:
            self.train(was)

    def decode(self, tokens):
        """As NeuralTokenizer.decode, and a list of sequences of their own lengths (what encode_batch gives
        with a target PSNR) decodes as one batch."""
        if isinstance(tokens, (list, tuple)):
            return self.decode_variable(tokens)
        return super().decode(tokens)

    @torch.no_grad()
    def decode_variable(self, sequences) -> torch.Tensor:
        """Images [B, 3, S, S] from B token sequences of any lengths 1..num_tokens, in one batch: each row's
        missing tail counts as dropped, as in decode_tensor of its prefix."""
        k_all = self.config.num_tokens
        if not sequences:
            raise ValueError("Image1DTokenizer.decode_variable: expected at least one token sequence")
        seqs = [self.check_tokens(s) for s in sequences]
        bad = [i for i, s in enumerate(seqs) if s.dim() != 1 or not 1 <= s.numel() <= k_all]
        if bad:
            raise ValueError(f"Image1DTokenizer.decode_variable: sequence {bad[0]} must be 1-D with 1..{k_all} "
                             f"tokens, got shape {tuple(seqs[bad[0]].shape)}")
        lengths = torch.tensor([s.numel() for s in seqs], device=self.device)
        padded = torch.zeros(len(seqs), k_all, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            padded[i, :s.numel()] = s
        was = self.training
        self.eval()
        try:
            return self.decode_latents(self.quantizer.decode(padded), lengths).clamp(0, 1)
        finally:
            self.train(was)

    def metrics(self, x, recon) -> dict:
        return image_metrics(x, recon)

    @torch.no_grad()
    def psnr_by_prefix(self, x: torch.Tensor, lengths) -> list[float]:
        """PSNR of decoding only the first k tokens, for each k in lengths."""
        tokens = self.encode_tensor(x)
        return [psnr(x, self.decode_tensor(tokens[:, :k])) for k in lengths]


def _image_preview(self, x, recon):
    return [(a, b.clamp(0, 1)) for a, b in zip(x, recon)]


ImageConvTokenizer.preview = _image_preview
Image1DTokenizer.preview = _image_preview
