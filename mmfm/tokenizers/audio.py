"""Audio: a 1D convolutional codec over the waveform with residual VQ (SoundStream / EnCodec shape).

Encoder: a conv stem, then per stride s a residual block and a stride-s conv (kernel = stride,
so lengths divide exactly); the frame rate is sample_rate / prod(strides) (`frame_rate_hz`, when
given, declares it and is checked against the strides: 50 Hz = hop 320, 25 Hz = hop 640, 12.5 Hz =
hop 1280 at 16 kHz; the lower-rate configs keep the same stages and widths and only lengthen the
stride kernels, so a rate comparison is not a comparison of model sizes). Each frame's latent
goes through ResidualVQ with quantizer dropout (a batch trains with only its first n levels,
n random), so a prefix of levels decodes. Decoder: the mirror with transposed convs.
Loss: L1 on the waveform + mel_weight * multi-scale mel distance + the RVQ loss.

Tokens: frames x levels, frame-major ([f0 l0, f0 l1, ..., f1 l0, ...]); token rate in Hz =
frame rate * levels. Input: mono float waveform [clip_samples] at sample_rate; `prepare` mixes
a shard sample down to mono, resamples (scipy's polyphase filter) and crops / zero-pads to the clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.data.schema import PRIMARY_FIELDS
from mmfm.quantizers import ResidualVQ
from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, check_finite, seeded_init
from mmfm.tokenizers.metrics import log_mel, mel_distance, snr_db
from mmfm.tokenizers.registry import register


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    clip_samples: int = 8000
    channels: int = 16
    strides: list[int] = field(default_factory=lambda: [4, 4, 4, 5])
    latent_dim: int = 32
    codebook_size: int = 256
    num_levels: int = 4
    quantizer_dropout: float = 0.5
    mel_weight: float = 0.5
    # frames per second the strides must give (0: not declared, whatever sample_rate / prod(strides)
    # is); a config that names its rate fails loudly when someone edits the strides or the sample rate
    frame_rate_hz: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.sample_rate not in (16000, 24000):
            raise ValueError(f"sample_rate: must be 16000 or 24000, got {self.sample_rate}")
        if not self.strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.strides):
            raise ValueError(f"strides: expected a non-empty list of integers >= 1, got {self.strides!r}")
        hop = math.prod(self.strides)
        r = self.frame_rate_hz
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0 or math.isinf(r):
            raise ValueError(f"frame_rate_hz: expected frames per second > 0 (or 0 = not declared), got {r!r}")
        if r:
            want = self.sample_rate / r
            if abs(want - round(want)) > 1e-9:
                raise ValueError(f"frame_rate_hz: {r} Hz does not divide sample_rate {self.sample_rate} into a "
                                 f"whole hop ({want:.4g} samples per frame); pick a rate with "
                                 f"sample_rate / frame_rate_hz an integer, e.g. 50, 25 or 12.5 at 16000")
            if round(want) != hop:
                raise ValueError(f"frame_rate_hz: {r} Hz needs a hop of {round(want)} samples, but strides "
                                 f"{self.strides} give prod(strides) = {hop} ({self.sample_rate / hop:g} Hz)")
        if self.clip_samples % hop:
            raise ValueError(f"clip_samples: {self.clip_samples} is not a multiple of prod(strides) = {hop} "
                             f"(the hop at {self.sample_rate / hop:g} frames/s); a whole number of frames per clip "
                             f"is needed, e.g. {max(1, round(self.clip_samples / hop)) * hop}")


class _ResBlock1d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ELU(), nn.Conv1d(c, c, 7, padding=3), nn.ELU(), nn.Conv1d(c, c, 1))

    def forward(self, x):
        return x + self.body(x)


def waveform_of(sample, rate: int, clip: int, owner: str) -> torch.Tensor:
    if isinstance(sample, torch.Tensor):
        if sample.dim() != 1:
            raise ValueError(f"{owner}: waveform tensor must be mono [N], got shape {tuple(sample.shape)}")
        audio, src_rate = sample.float().numpy(), rate
    else:
        field = next((f for f in PRIMARY_FIELDS["audio"] if isinstance(sample, dict) and f in sample), None)
        if field is None:
            raise ValueError(f"{owner}: sample must be a waveform tensor or a dict with an audio field "
                             f"({', '.join(PRIMARY_FIELDS['audio'])})")
        audio, src_rate = sample[field]
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio.mean(1) if audio.ndim == 2 else audio
    if audio.size == 0:
        raise ValueError(f"{owner}: audio is empty (0 samples)")
    if not np.isfinite(audio).all():
        raise ValueError(f"{owner}: audio contains NaN or infinite values")
    if src_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(int(src_rate), rate)
        audio = resample_poly(audio, rate // g, int(src_rate) // g).astype(np.float32)
    out = np.zeros(clip, np.float32)
    n = min(clip, audio.shape[0])
    out[:n] = audio[:n]
    return torch.from_numpy(out)


@register("audio_codec", AudioConfig)
class AudioCodec(NeuralTokenizer):
    modality = "audio"

    @seeded_init
    def __init__(self, config: AudioConfig):
        super().__init__(config)
        config.validate()
        c = config
        enc, ch = [nn.Conv1d(1, c.channels, 7, padding=3)], c.channels
        for s in c.strides:
            enc += [_ResBlock1d(ch), nn.ELU(), nn.Conv1d(ch, ch * 2, s, stride=s)]
            ch *= 2
        enc += [nn.ELU(), nn.Conv1d(ch, c.latent_dim, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv1d(c.latent_dim, ch, 7, padding=3)]
        for s in reversed(c.strides):
            dec += [nn.ELU(), nn.ConvTranspose1d(ch, ch // 2, s, stride=s), _ResBlock1d(ch // 2)]
            ch //= 2
        dec += [nn.ELU(), nn.Conv1d(ch, 1, 7, padding=3)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = ResidualVQ(c.latent_dim, c.codebook_size, c.num_levels,
                                    quantizer_dropout=c.quantizer_dropout, seed=c.seed)
        self.hop = math.prod(c.strides)
        self.frames = c.clip_samples // self.hop

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def tokens_per_sample(self) -> int:
        return self.frames * self.config.num_levels

    @property
    def frame_rate_hz(self) -> float:
        return self.config.sample_rate / self.hop

    @property
    def token_rate_hz(self) -> float:
        return self.frame_rate_hz * self.config.num_levels

    def bits_per_second(self, levels: int | None = None) -> float:
        return self.frame_rate_hz * (levels or self.config.num_levels) * math.log2(self.config.codebook_size)

    def prepare(self, sample) -> torch.Tensor:
        return waveform_of(sample, self.config.sample_rate, self.config.clip_samples, "AudioCodec")

    def _check_batch(self, x):
        if x.dim() != 2 or x.shape[1] != self.config.clip_samples:
            raise ValueError(f"AudioCodec: waveforms must be [B, {self.config.clip_samples}], got {tuple(x.shape)}")
        check_finite(x, "AudioCodec", "the waveform batch")

    def latents(self, x):
        self._check_batch(x)
        return self.encoder(x[:, None]).transpose(1, 2)  # [B, frames, latent_dim]

    def decode_latents(self, z):
        return self.decoder(z.transpose(1, 2))[:, 0]

    def forward(self, x) -> StepOutput:
        out = self.quantizer(self.latents(x))
        recon = self.decode_latents(out.quantized)
        l1 = F.l1_loss(recon, x)
        mel = mel_distance(x, recon, self.config.sample_rate)
        loss = l1 + self.config.mel_weight * mel + out.loss
        metrics = {k: float(v) for k, v in out.metrics.items() if "/" not in k}
        metrics.update(l1=float(l1.detach()), mel=float(mel.detach()))
        return StepOutput(recon, loss, metrics)

    def encode_tensor(self, x):
        return self.quantizer.encode(self.latents(x)).reshape(x.shape[0], -1)

    def decode_tensor(self, tokens):
        """tokens [B, frames * m]: the first m levels of every frame (m <= num_levels) decode."""
        n = tokens.shape[1]
        if n % self.frames or not 1 <= n // self.frames <= self.config.num_levels:
            raise ValueError(f"AudioCodec.decode: expected frames x levels = {self.frames} x m tokens "
                             f"(m in 1..{self.config.num_levels}), got {n}")
        z = self.quantizer.decode(tokens.reshape(tokens.shape[0], self.frames, n // self.frames))
        return self.decode_latents(z)

    def metrics(self, x, recon) -> dict:
        return {"snr_db": snr_db(x, recon), "mel_distance": float(mel_distance(x, recon, self.config.sample_rate)),
                "token_rate_hz": self.token_rate_hz, "bits_per_s": self.bits_per_second()}

    def preview(self, x, recon):
        from mmfm.tokenizers.render import normalise

        a, b = log_mel(x, self.config.sample_rate, 512), log_mel(recon, self.config.sample_rate, 512)
        lo, hi = float(a.min()), float(a.max())
        return [(normalise(p.flip(0), lo, hi), normalise(q.flip(0), lo, hi)) for p, q in zip(a, b)]
