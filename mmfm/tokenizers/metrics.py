"""Reconstruction metrics, each on batches (first dim B) and returning a float mean over the batch.

psnr, ssim (images in [0, 1]); snr_db and mel_distance (waveforms); chamfer and f_score (point
sets); rel_l2 (fields). Plain torch, short enough to check by eye.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> float:
    """Mean over the batch of 10 log10(peak^2 / MSE) per sample (MSE floored at 1e-10)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(peak ** 2 / mse)).mean())


def psnr_per_sample(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(peak ** 2 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> float:
    """SSIM (Wang et al. 2004) with a 7x7 Gaussian window (sigma 1.5), per channel, on [B, C, H, W];
    7 rather than 11 so that 32x32 images keep a valid interior."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian_window().to(x).repeat(c, 1, 1, 1)
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-noise ratio of reconstruction y against x [B, ..., N], in dB, mean over the batch."""
    sig = (x.float() ** 2).flatten(1).sum(1)
    noise = ((x.float() - y.float()) ** 2).flatten(1).sum(1).clamp_min(1e-12)
    return float((10 * torch.log10(sig.clamp_min(1e-12) / noise)).mean())


def _mel_filterbank(n_fft: int, n_mels: int, rate: int) -> torch.Tensor:
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    pts = torch.tensor([inv(m) for m in torch.linspace(mel(0), mel(rate / 2), n_mels + 2).tolist()])
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs - lo) / (mid - lo).clamp_min(1e-5)
    down = (hi - freqs) / (hi - mid).clamp_min(1e-5)
    return torch.clamp(torch.minimum(up, down), min=0)  # [n_mels, n_fft // 2 + 1]


def log_mel(x: torch.Tensor, rate: int, n_fft: int, n_mels: int = 40) -> torch.Tensor:
    """log(mel power + 1e-5) of waveforms [B, N] -> [B, n_mels, frames]."""
    spec = torch.stft(x.float(), n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft, device=x.device),
                      return_complex=True).abs() ** 2
    fb = _mel_filterbank(n_fft, n_mels, rate).to(x.device)
    return torch.log(torch.einsum("mf,bft->bmt", fb, spec) + 1e-5)


def mel_distance(x: torch.Tensor, y: torch.Tensor, rate: int, scales=(256, 512, 1024)) -> torch.Tensor:
    """Multi-scale mel distance: mean over FFT sizes of the L1 distance of log-mel spectrograms
    (as in DAC / EnCodec's losses). A tensor, so it also serves as a training loss."""
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return torch.stack([(log_mel(x, rate, n) - log_mel(y, rate, n)).abs().mean() for n in scales]).mean()


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance between point sets a [B, N, 3] and b [B, M, 3]: mean squared
    nearest-neighbour distance a->b plus b->a, per sample [B]."""
    d = torch.cdist(a.float(), b.float()) ** 2
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def f_score(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.05) -> float:
    """F-score at `threshold` (Tatarchenko et al. 2019): harmonic mean of precision (share of b within
    threshold of a) and recall (share of a within threshold of b); mean over the batch."""
    d = torch.cdist(a.float(), b.float())
    recall = (d.min(2).values < threshold).float().mean(1)
    precision = (d.min(1).values < threshold).float().mean(1)
    f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f.mean())


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """||y - x|| / ||x|| per sample, mean over the batch."""
    num = (x.float() - y.float()).flatten(1).norm(dim=1)
    return float((num / x.float().flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


class PCAFeatures:
    """A fixed linear feature map for Fréchet distances where no pretrained network may be downloaded
    (FID's Inception is one): the top `k` principal components of flattened samples, fitted once on
    real training data and then applied to every set compared, so all sets are measured alike."""

    def __init__(self, x: torch.Tensor, k: int = 32):
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[0] <= k:
            raise ValueError(f"PCAFeatures: fitting {k} components needs more than {k} samples, got {flat.shape[0]}")
        self.mean = flat.mean(0)
        _, _, v = torch.linalg.svd(flat - self.mean, full_matrices=False)
        self.components = v[:k]                   # [k, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1).double() - self.mean) @ self.components.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, k] and b [M, k] (FID's formula):
    |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)). The trace of the matrix square root is taken as
    the sum of the square roots of the eigenvalues of Ca^(1/2) Cb Ca^(1/2), which is symmetric PSD, so
    no complex sqrtm is needed."""
    a, b = a.double(), b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"frechet_distance: expected two [N, k] feature sets with N >= 2 and the same k, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    ca, cb = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)
