"""Rate-distortion: a tokenizer and its baselines at several bit budgets (`mmfm tokenizer eval --rd`).

A tokenizer gives points at several rates without retraining where its design allows:
    image_tokenbridge  the post-training bins refitted at 2..64 bins per channel (`with_bins`)
    image_1d           the first k tokens (nested dropout trains every prefix to decode)
    audio_codec        the first m residual-VQ levels of every frame (quantizer dropout)
Each budget's baselines spend at most the same bits (image: bicubic, JPEG, JPEG with shared tables,
WebP; audio: 8-bit mu-law at the rate the bits allow) and every record carries the bits it really
spent (`bits`, per sample; audio also `bits_per_s`), so a codec that cannot get under the budget
shows by how much it is over.
"""
from __future__ import annotations

import math

import torch

from mmfm.tokenizers import baselines as B
from mmfm.tokenizers.metrics import mel_distance, psnr, snr_db, ssim

TOKENBRIDGE_BINS = (2, 4, 8, 16, 32, 64)


def image_baselines(x: torch.Tensor, bits: float) -> list[dict]:
    """Bicubic, JPEG (whole file), JPEG with shared tables and WebP at `bits` per image of x [B, 3, H, W]."""
    out = []
    r, s = B.bicubic_down_up(x, bits)
    spent = 8 * x.shape[1] * s * s   # a 1x1 image is the floor: a budget under 24 bits is overspent
    out.append({"impl": "bicubic", "psnr": psnr(x, r), "ssim": ssim(x, r), "bits": spent, "side": s,
                "over_budget": float(spent > bits)})
    for impl, fmt, abbrev in (("jpeg", "JPEG", False), ("jpeg_shared_tables", "JPEG", True), ("webp", "WEBP", False)):
        r, used, q = B.pillow_at_bytes(x, bits / 8, fmt, abbreviated=abbrev)
        out.append({"impl": impl, "psnr": psnr(x, r), "ssim": ssim(x, r), "bits": round(8 * sum(used) / len(used), 1),
                    "over_budget": sum(u * 8 > bits for u in used) / len(used), "quality": sum(q) / len(q)})
    return out


def _batched(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(b) for b in x.split(16)])


def tokenizer_points(tok, x: torch.Tensor, train: torch.Tensor | None = None) -> list[tuple[str, float, torch.Tensor]]:
    """[(label, bits per sample, reconstruction of x)] for a tokenizer at each rate it supports."""
    name = tok.registry_name
    if name == "image_tokenbridge":
        if train is None:
            raise ValueError("tokenizer_points: image_tokenbridge needs 'train' images to refit its bins")
        pts = []
        for nb in TOKENBRIDGE_BINS:
            t = tok.with_bins(nb, train)
            pts.append((f"{nb} bins", t.bits_per_sample, _batched(lambda b: t.decode_tensor(t.encode_tensor(b)), x)))
        return pts
    if name == "image_1d":
        from mmfm.tokenizers.commands import prefix_lengths

        per = math.log2(tok.vocab_size)
        return [(f"{k} tokens", k * per, _batched(lambda b: tok.decode_tensor(tok.encode_tensor(b)[:, :k]), x))
                for k in prefix_lengths(tok.tokens_per_sample)]
    if name == "audio_codec":
        c, f = tok.config, tok.frames

        def first_levels(m):
            return lambda b: tok.decode_tensor(tok.encode_tensor(b).reshape(b.shape[0], f, -1)[..., :m]
                                               .reshape(b.shape[0], -1))
        return [(f"{m} levels", f * m * math.log2(c.codebook_size), _batched(first_levels(m), x))
                for m in range(1, c.num_levels + 1)]
    return []


def rd_records(name: str, tok, x: torch.Tensor, train: torch.Tensor | None = None) -> list[dict]:
    """Records (bench "tokenizer_rd") of the tokenizer and its baselines at each of its rates."""
    recs = []
    for label, bits, recon in tokenizer_points(tok, x, train):
        case = {"tokenizer": name, "rate": label, "budget_bits": round(bits, 1)}
        if tok.modality == "image":
            recs.append({"bench": "tokenizer_rd", "case": case, "impl": "mmfm", "psnr": psnr(x, recon),
                         "ssim": ssim(x, recon), "bits": round(bits, 1)})
            recs += [{"bench": "tokenizer_rd", "case": case, **r} for r in image_baselines(x, bits)]
        elif tok.modality == "audio":
            rate, seconds = tok.config.sample_rate, tok.config.clip_samples / tok.config.sample_rate
            recs.append({"bench": "tokenizer_rd", "case": case, "impl": "mmfm", "snr_db": snr_db(x, recon),
                         "mel_distance": float(mel_distance(x, recon, rate)), "bits": round(bits, 1),
                         "bits_per_s": round(bits / seconds, 1)})
            r, low = B.mu_law_resample(x, rate, bits / seconds)
            recs.append({"bench": "tokenizer_rd", "case": case, "impl": "mulaw_resample", "snr_db": snr_db(x, r),
                         "mel_distance": float(mel_distance(x, r, rate)), "bits": round(8 * low * seconds, 1),
                         "bits_per_s": 8 * low})
    return recs


def rd_plot(path: str, records: list[dict], metric: str, title: str, skip=("jpeg",)) -> None:
    """One line per (tokenizer, impl): `metric` against bits per sample, from rd_records' records. `skip`:
    impls left off the plot (a whole JPEG file of a 32x32 image is ~5000 bits at any budget: its
    tables alone are larger than every budget, and its one point would squash the rest)."""
    from mmfm.tokenizers.render import multi_line_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get(metric) is None or r.get("bits") is None or r["impl"] in skip:
            continue
        label = r["impl"] if r["impl"] != "mmfm" else f"mmfm {r['case']['tokenizer']}"
        series.setdefault(label, []).append((float(r["bits"]), float(r[metric])))
    multi_line_plot(path, {k: sorted(v) for k, v in series.items()}, title, "bits per sample", metric)
