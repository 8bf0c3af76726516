"""Adaptive token length for the 1D image tokenizer (in the manner of KARL: predict in one pass how
many tokens an image needs for a target quality).

The 1D tokenizer is trained with nested dropout, so the first k of its K tokens decode for every k.
An image needs n(t) = min{k : PSNR(k) >= t} tokens to reach a target PSNR t (K if it never does).
The length head reads the encoder's output once (the K continuous latents before quantization)
and predicts the image's whole prefix curve PSNR(1..K). The curve is built non-decreasing in k
(a base value plus softplus increments), so the predicted length

    k_hat(t) = min{k : curve_hat(k) - margin >= t}   (K if none)

never falls as t rises, for every image: monotone in the target by construction, not by training.

Labels are the tokenizer's own measured curves on its training images (never held-out ones): for
each image the PSNR of decoding its first k tokens, k = 1..K, made non-decreasing by a running
maximum (the needed length depends only on that envelope). The head is fitted on part of the
training images; the margin is then calibrated on the rest (split conformal) so that on those
images the predicted length reaches the target for `length_coverage` of the (image, target) pairs
whose target is reachable at all. Targets for calibration span the training curves' range.

`equal_psnr_records` is the claim's measurement: mean bits per image of adaptive lengths against
fixed lengths and against the oracle (each image's measured needed length), compared at equal mean
PSNR by interpolating each method's (bits, mean PSNR) points; the interpolation between two
neighbouring points is achievable by time-sharing (encode a share of the images at one point and
the rest at the other), so the fixed baseline is a real operating point, not a fit.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.tokenizers.metrics import psnr_per_sample

CALIBRATION_TARGETS = 24   # targets spread over the training curves' range when calibrating the margin


class LengthHead(nn.Module):
    """K latents [B, K, d] -> predicted PSNR after k tokens, [B, K], non-decreasing in k."""

    def __init__(self, num_tokens: int, latent_dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(num_tokens * latent_dim), nn.Linear(num_tokens * latent_dim, width),
                                 nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_tokens))
        # dB scale: the base is set to the data's mean PSNR(1) at fit time; increments start small
        self.register_buffer("base", torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z.flatten(1))
        first = out[:, :1] + self.base
        return torch.cat([first, first + torch.cumsum(F.softplus(out[:, 1:]), 1)], 1)


def lengths_from_curves(curves: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The smallest k (1-based) with curves[b, k-1] >= targets[b, j], else K: [B, J] from curves [B, K]
    and targets [B, J] (or [J], the same for every row). For a non-decreasing curve this is monotone
    in the target."""
    k_all = curves.shape[1]
    if targets.dim() == 1:
        targets = targets[None].expand(curves.shape[0], -1)
    reached = curves[:, None, :] >= targets[:, :, None]                 # [B, J, K]
    first = torch.where(reached, torch.arange(k_all, device=curves.device), k_all).amin(2)
    return (first + 1).clamp_max(k_all)


def saturated_lengths(curves: torch.Tensor, saturation_db: float) -> torch.Tensor:
    """[B]: the first k whose curve value is within saturation_db of the curve's last (highest) value, where
    the image's own curve has flattened out."""
    return lengths_from_curves(curves, curves[:, -1:] - saturation_db)[:, 0]


def slope_lengths(curves: torch.Tensor, db_per_token: float) -> torch.Tensor:
    """[B]: argmax_k curves[b, k] - db_per_token * k, the rate-distortion allocation: every image stops where
    one more token would buy less than db_per_token dB, which minimises the mean tokens at the mean PSNR
    it reaches when the curves are right (a Lagrangian over images)."""
    k = torch.arange(1, curves.shape[1] + 1, device=curves.device)
    return (curves - db_per_token * k).argmax(1) + 1


@torch.no_grad()
def prefix_curves(tok, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Per-image PSNR of decoding the first k tokens, for k = 1..K: [N, K] (the tokenizer's eval mode)."""
    was = tok.training
    tok.eval()
    try:
        rows = []
        for b in x.split(batch):
            b = b.to(tok.device)
            q = tok.quantizer.decode(tok.encode_tensor(b))
            keep = torch.ones(b.shape[0], dtype=torch.long, device=b.device)
            rows.append(torch.stack([psnr_per_sample(b, tok.decode_latents(q, keep * k).clamp(0, 1))
                                     for k in range(1, tok.config.num_tokens + 1)], 1).cpu())
        return torch.cat(rows)
    finally:
        tok.train(was)


@torch.no_grad()
def head_inputs(tok, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    was = tok.training
    tok.eval()
    try:
        return torch.cat([tok.latents(b.to(tok.device)).cpu() for b in x.split(batch)])
    finally:
        tok.train(was)


def calibration_targets(curves: torch.Tensor, n: int = CALIBRATION_TARGETS) -> torch.Tensor:
    """n targets evenly spread from the 5th percentile of PSNR(1) to the 95th of PSNR(K)."""
    lo = float(torch.quantile(curves[:, 0], 0.05))
    hi = float(torch.quantile(curves[:, -1], 0.95))
    return torch.linspace(lo, max(hi, lo + 1e-3), n)


def coverage(curves: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of the (image, target) pairs reachable at all (some prefix reaches t) whose predicted length
    reaches the target when decoded; curves [N, K] measured per prefix, lengths [N, J], targets [J]."""
    got = curves.gather(1, lengths - 1)                                 # PSNR at the predicted length
    reachable = curves.amax(1, keepdim=True) >= targets[None]
    return float(((got >= targets[None]) & reachable).sum() / reachable.sum().clamp_min(1))


def calibrate_margin(pred: torch.Tensor, curves: torch.Tensor, targets: torch.Tensor, rate: float) -> float:
    """The smallest margin (dB, on a 0.02 dB grid) at which the predicted lengths reach the targets for
    `rate` of the reachable pairs. A larger margin only lengthens the prediction, so coverage rises
    with it (up to a curve that dips after its first crossing); at the top of the grid every length is
    K, which is not always where a dipping curve peaks, so the scan returns the top when nothing reaches rate."""
    span = float((curves - pred).abs().max()) + 0.1
    for margin in torch.arange(-span, span + 0.02, 0.02).tolist():
        if coverage(curves, lengths_from_curves(pred - margin, targets), targets) >= rate:
            return margin
    return span


def length_head_loss(pred: torch.Tensor, curves: torch.Tensor, slope_weight: float) -> torch.Tensor:
    """The head's loss on predicted and measured curves [B, K]: smooth L1 on the curve, plus
    slope_weight x smooth L1 on its per-token increments. The target rule needs the curve's level
    (where it crosses t), the slope rule only its differences across images (which image gains
    more from one more token); with the curve alone, errors in the level that are shared along an
    image's curve dominate the fit, and the increments it predicted ranked images too poorly for
    the slope rule to save bits on held-out images (docs/benchmarks.md, "Adaptive length")."""
    loss = F.smooth_l1_loss(pred, curves)
    if slope_weight:
        loss = loss + slope_weight * F.smooth_l1_loss(pred.diff(dim=1), curves.diff(dim=1))
    return loss


def fit_length_head(tok, x: torch.Tensor, log=None) -> dict:
    """Fit tok.length_head on training images x [N, 3, S, S] and calibrate tok.length_margin; returns the
    fit's figures (residuals, coverage on the calibration images, mean lengths)."""
    c = tok.config
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if x.shape[0] < 8:
        raise ValueError(f"fit_length_head: needs at least 8 training images, got {x.shape[0]}")
    curves = prefix_curves(tok, x)
    envelope = torch.cummax(curves, 1).values
    z = head_inputs(tok, x)
    g = torch.Generator().manual_seed(c.seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_cal = max(4, int(round(c.length_calib_fraction * x.shape[0])))
    cal, fit = perm[:n_cal], perm[n_cal:]
    head = tok.length_head
    dev = next(head.parameters()).device
    head.base.fill_(float(envelope[fit, 0].mean()))
    # weight decay: the head sees a few thousand images of K x latent_dim inputs and overfits without it
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c.length_head_steps)
    head.train()
    batch = min(256, fit.numel())
    for step in range(c.length_head_steps):
        idx = fit[torch.randint(fit.numel(), (batch,), generator=g)]
        loss = length_head_loss(head(z[idx].to(dev)), envelope[idx].to(dev), c.length_head_slope_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, c.length_head_steps // 5) == 0:
            log(f"length head step {step}: loss {loss.item():.4f}")
    head.eval()
    with torch.no_grad():
        pred = head(z.to(dev)).cpu()
    targets = calibration_targets(envelope[fit])
    margin = calibrate_margin(pred[cal], curves[cal], targets, c.length_coverage)
    tok.length_margin.fill_(margin)
    lengths = lengths_from_curves(pred - margin, targets)
    oracle = lengths_from_curves(envelope, targets)
    stats = {"images_fit": int(fit.numel()), "images_calibration": int(n_cal), "margin_db": margin,
             "mae_fit_db": float((pred[fit] - envelope[fit]).abs().mean()),
             "mae_calibration_db": float((pred[cal] - envelope[cal]).abs().mean()),
             "coverage_calibration": coverage(curves[cal], lengths[cal], targets),
             "coverage_fit": coverage(curves[fit], lengths[fit], targets), "target_rate": c.length_coverage,
             "mean_length": float(lengths.float().mean()), "mean_oracle_length": float(oracle.float().mean()),
             "targets_db": [round(t, 2) for t in targets.tolist()]}
    log("length head: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, float)))
    return stats


# ------------------------------------------------------------------------ the claim, at equal PSNR
def _interp_bits(points: list[tuple[float, float]], p: float) -> float | None:
    """Bits at mean PSNR p on the lower envelope of (bits, psnr) points, by time-sharing between the two
    neighbouring points that bracket p (None when p is outside their PSNR range)."""
    pts = sorted(points)
    hull: list[tuple[float, float]] = []   # keep only points that raise the PSNR as bits rise
    for b, q in pts:
        if not hull or q > hull[-1][1]:
            hull.append((b, q))
    for (b0, q0), (b1, q1) in zip(hull, hull[1:]):
        if q0 <= p <= q1:
            return b0 + (b1 - b0) * (p - q0) / (q1 - q0)
    if hull and abs(hull[0][1] - p) < 1e-9:
        return hull[0][0]
    return None


def equal_psnr_records(tok, x: torch.Tensor, targets, name: str, saturation_db: float = 0.0,
                       slopes=()) -> list[dict]:
    """Records (bench "tokenizer_adaptive") on held-out images x: per target, the adaptive length's mean
    bits and mean PSNR, the bits fixed lengths and the oracle spend at that same mean PSNR, and the
    adaptive length's hit rate. Bits per image = tokens x log2(vocab), plus log2(K) for the length of a
    variable sequence (in the unified stream the <end_image> marker carries it; counted anyway)."""
    k_all = tok.config.num_tokens
    per_token, length_bits = math.log2(tok.vocab_size), math.log2(k_all)
    curves = prefix_curves(tok, x)
    envelope = torch.cummax(curves, 1).values
    pred = tok.predicted_curves(x).cpu()
    fixed = [(k * per_token, float(curves[:, k - 1].mean())) for k in range(1, k_all + 1)]
    dense = torch.linspace(float(curves.min()) - 1, float(envelope[:, -1].max()) + 1, 400)
    oracle_lengths = lengths_from_curves(envelope, dense)
    oracle = [(float(oracle_lengths[:, j].float().mean()) * per_token + length_bits,
               float(curves.gather(1, oracle_lengths[:, j:j + 1] - 1).mean())) for j in range(dense.numel())]
    recs = []
    t = torch.tensor([float(v) for v in targets])
    lengths = lengths_from_curves(pred - float(tok.length_margin), t)
    if saturation_db > 0:
        lengths = torch.minimum(lengths, saturated_lengths(pred, saturation_db)[:, None])
    for lam in slopes:   # the rate-distortion rule: no target, one slope for every image
        k = slope_lengths(pred, float(lam))
        bits = float(k.float().mean()) * per_token + length_bits
        p = float(curves.gather(1, (k - 1)[:, None]).mean())
        bf, bo = _interp_bits(fixed, p), _interp_bits(oracle, p)
        recs.append({"bench": "tokenizer_adaptive", "case": {"tokenizer": name, "db_per_token": float(lam)},
                     "impl": "slope", "mean_psnr": round(p, 3), "bits": round(bits, 1),
                     "mean_tokens": round(float(k.float().mean()), 3),
                     "fixed_bits_same_psnr": None if bf is None else round(bf, 1),
                     "oracle_bits_same_psnr": None if bo is None else round(bo, 1),
                     "saving_vs_fixed": None if bf is None else round(1 - bits / bf, 4), "samples": x.shape[0]})
    for j, target in enumerate(t.tolist()):
        k = lengths[:, j]
        got = curves.gather(1, (k - 1)[:, None])[:, 0]
        p = float(got.mean())
        bits = float(k.float().mean()) * per_token + length_bits
        bf, bo = _interp_bits(fixed, p), _interp_bits(oracle, p)
        reachable = envelope[:, -1] >= target
        need = lengths_from_curves(envelope, torch.tensor([target]))[:, 0]
        recs.append({"bench": "tokenizer_adaptive", "case": {"tokenizer": name, "target_psnr": round(target, 2)},
                     "impl": "adaptive", "saturation_db": saturation_db, "mean_psnr": round(p, 3),
                     "bits": round(bits, 1),
                     "mean_tokens": round(float(k.float().mean()), 3),
                     "fixed_bits_same_psnr": None if bf is None else round(bf, 1),
                     "oracle_bits_same_psnr": None if bo is None else round(bo, 1),
                     "saving_vs_fixed": None if bf is None else round(1 - bits / bf, 4),
                     "oracle_tokens_same_target": round(float(need.float().mean()), 3),
                     "hit_rate": round(float((got[reachable] >= target).float().mean()), 4) if reachable.any()
                     else None, "reachable": round(float(reachable.float().mean()), 4), "samples": x.shape[0]})
    return recs


def fixed_records(tok, x: torch.Tensor, name: str) -> list[dict]:
    """The fixed-length points (every k) on the same held-out images, for the table beside the adaptive rows."""
    curves = prefix_curves(tok, x)
    per_token = math.log2(tok.vocab_size)
    return [{"bench": "tokenizer_adaptive", "case": {"tokenizer": name, "tokens": k}, "impl": "fixed",
             "mean_psnr": round(float(curves[:, k - 1].mean()), 3), "bits": round(k * per_token, 1),
             "samples": x.shape[0]} for k in range(1, tok.config.num_tokens + 1)]


# ------------------------------------------------------------------------------------------ CLI
def add_length_parsers(tsub) -> None:
    """`mmfm tokenizer length-head` and `mmfm tokenizer adaptive` (called by commands.add_tokenizer_parser)."""
    lh = tsub.add_parser("length-head", help="image_1d: fit the adaptive-length head on a trained tokenizer's "
                                             "training images and save the tokenizer with it")
    lh.add_argument("--config", required=True, help="an image_1d config (its train.out holds the tokenizer)")
    lh.add_argument("--out", default=None, help="override train.out")
    lh.add_argument("--max-train", type=int, default=0, help="training images to fit on (0 = all)")
    ad = tsub.add_parser("adaptive", help="image_1d with a length head: held-out bits per image of adaptive "
                                          "length against fixed length and the oracle at equal mean PSNR")
    ad.add_argument("--config", required=True)
    ad.add_argument("--out", default=None, help="override train.out")
    ad.add_argument("--targets", default="", help="comma-separated target PSNRs in dB (default: 8 spread over "
                                                  "the fixed lengths' mean PSNR range)")
    ad.add_argument("--saturation-db", type=float, default=None,
                    help="also stop within this many dB of each image's predicted ceiling (default: the config's "
                         "length_saturation_db)")
    ad.add_argument("--slopes", default="", help="comma-separated dB-per-token slopes for the rate-distortion rule "
                                                 "(lengths_at_slope), e.g. 0.05,0.1,0.2")
    ad.add_argument("--max-samples", type=int, default=0, help="held-out images (0 = all)")
    ad.add_argument("--json", metavar="PATH")


def _load(args, need_head: bool):
    import os

    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.config import ConfigError, load_config

    cfg = load_config(args.config)
    tok = load_tokenizer(os.path.join(args.out or cfg.train.out, "tokenizer"))
    if tok.registry_name != "image_1d":
        raise ConfigError(f"{args.config}: mmfm tokenizer {args.tokenizer_command} needs an image_1d tokenizer, "
                          f"got {tok.registry_name!r}")
    if need_head and not tok.config.length_head:
        raise ConfigError(f"{args.config}: the saved tokenizer has no length head (length_head: false); fit one with "
                          "mmfm tokenizer length-head --config ...")
    return cfg, tok


def with_length_head(tok, **fields):
    """A copy of an image_1d tokenizer with length_head enabled (fields override the config's length_*
    settings); the encoder and decoder weights are copied, the head is fresh."""
    import dataclasses

    from mmfm.tokenizers.registry import build_tokenizer

    cfg = dataclasses.replace(tok.config, length_head=True, **fields)
    new = build_tokenizer("image_1d", cfg)
    # a head the tokenizer already has (of any width) is not carried over: the new one is fitted afresh
    weights = {k: v for k, v in tok.state_dict().items() if not k.startswith("length_")}
    missing, unexpected = new.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("length_") for k in missing):
        raise ValueError(f"with_length_head: weights do not match (missing {missing}, unexpected {unexpected})")
    return new.to(tok.device)


def length_head_main(args) -> int:
    import os

    from mmfm.jsonio import write_json
    from mmfm.tokenizers.data import prepare_all, read_samples

    cfg, tok = _load(args, need_head=False)
    m = cfg.model
    fields = {k: getattr(m, k) for k in ("length_head_width", "length_head_steps", "length_head_slope_weight",
                                         "length_coverage", "length_calib_fraction")}
    tok = with_length_head(tok, **fields)
    d = cfg.data
    x = prepare_all(tok, read_samples(d.shards, d.modality, "train", d.holdout_fraction, args.max_train))
    stats = fit_length_head(tok, x)
    out = os.path.join(args.out or cfg.train.out, "tokenizer")
    tok.save(out)
    write_json(os.path.join(args.out or cfg.train.out, "length_head_fit.json"), stats)
    print(f"length head fitted on {x.shape[0]} training images (margin {stats['margin_db']:.3f} dB, coverage on the "
          f"calibration images {stats['coverage_calibration']:.3f} for rate {stats['target_rate']}); saved to {out}")
    return 0


def adaptive_main(args) -> int:
    from mmfm.jsonio import write_records
    from mmfm.tokenizers.commands import _config_name, print_records
    from mmfm.tokenizers.config import ConfigError
    from mmfm.tokenizers.data import prepare_all, read_samples

    cfg, tok = _load(args, need_head=True)
    d = cfg.data
    held = read_samples(d.shards, d.modality, "eval", d.holdout_fraction)
    x = prepare_all(tok, held[:args.max_samples] if args.max_samples else held)
    name = _config_name(args.config)
    fixed = fixed_records(tok, x, name)
    if args.targets:
        try:
            targets = [float(v) for v in args.targets.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--targets: expected comma-separated PSNRs in dB, got {args.targets!r}") from None
    else:
        lo, hi = fixed[0]["mean_psnr"], fixed[-1]["mean_psnr"]
        targets = [round(lo + (hi - lo) * i / 7, 2) for i in range(8)]
    try:
        slopes = [float(v) for v in args.slopes.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--slopes: expected comma-separated dB per token, got {args.slopes!r}") from None
    sat = tok.config.length_saturation_db if args.saturation_db is None else args.saturation_db
    if sat < 0:
        raise ConfigError(f"--saturation-db: expected dB >= 0, got {sat}")
    recs = fixed + equal_psnr_records(tok, x, targets, name, sat, slopes)
    print_records(recs, key=lambda r: r["impl"])
    write_records(recs, args.json)
    return 0
