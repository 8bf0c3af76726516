"""LARP in the video tokenizer (mmfm/tokenizers/larp.py, video.py): the stochastic VQ, the AR prior
trained jointly, its gradient path into the encoder, save/load and config errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmfm.tokenizers.base import load_tokenizer
from mmfm.tokenizers.config import load_config
from mmfm.tokenizers.train import _generators
from mmfm.tokenizers.video import VideoConfig, VideoTokenizer
from mmfm.typed_config import ConfigError

TINY = VideoConfig(frames=3, image_size=16, patch_size=8, temporal_patch=2, width=32, depth=1, heads=2,
                   num_queries=8, quantizer="svq", codebook_size=32, codebook_dim=8, prior_weight=0.5,
                   prior_width=32, prior_depth=1, prior_heads=2)


def clips(n: int, seed: int) -> torch.Tensor:
    """Moving blobs of a few colours: structured enough that a tokenizer has something to order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 3, 16, 16)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for i in range(n):
        colour = torch.rand(3, generator=g)
        cy, cx, vy, vx = (torch.rand(4, generator=g) * torch.tensor([16, 16, 4, 4]) - torch.tensor([0, 0, 2, 2]))
        for t in range(3):
            blob = torch.exp(-((yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2) / 10)
            x[i, t] = colour[:, None, None] * blob
    return x


def encoder_grads(tok) -> list[torch.Tensor]:
    return [p.grad for p in [*tok.encoder.parameters(), tok.queries, *tok.first_in.parameters()]]


def test_prior_loss_reaches_the_encoder_through_the_quantized_inputs():
    tok = VideoTokenizer(dataclasses.replace(TINY, svq_temperature=0.0))
    zq, idx, _, _ = tok.quantize(tok.latents(clips(4, 0)))
    tok.prior.loss(zq, idx).backward()
    grads = encoder_grads(tok)
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tok.decoder.parameters())        # the prior loss does not touch the decoder


def test_weight_zero_builds_no_prior_and_the_loss_is_reconstruction_alone():
    x = clips(4, 0)
    cfg = dataclasses.replace(TINY, svq_temperature=0.0)
    with_prior = VideoTokenizer(cfg)
    without = VideoTokenizer(dataclasses.replace(cfg, prior_weight=0.0))
    assert not hasattr(without, "prior") and not any(k.startswith("prior.") for k in without.state_dict())
    # same seed: every non-prior weight is drawn the same, so the difference in encoder gradients is the prior's
    without.load_state_dict({k: v for k, v in with_prior.state_dict().items() if not k.startswith("prior.")})
    out_w, out_0 = with_prior(x), without(x)
    assert "prior_bits_per_token" in out_w.metrics and "prior_bits_per_token" not in out_0.metrics
    recon_only = torch.nn.functional.mse_loss(out_0.recon, x) + without.quantize(without.latents(x))[2]
    assert torch.allclose(out_0.loss, recon_only)
    out_w.loss.backward()
    out_0.loss.backward()
    diff = sum(float((a - b).abs().sum()) for a, b in zip(encoder_grads(with_prior), encoder_grads(without)))
    assert diff > 1e-6


def test_svq_draws_in_training_argmax_at_eval_and_its_generator_is_checkpointed():
    tok = VideoTokenizer(TINY)
    z = tok.latents(clips(8, 1)).detach()
    tok.quantizer.train()
    a, b = tok.quantizer(z)[1], tok.quantizer(z)[1]
    assert not torch.equal(a, b)                                          # stochastic in training
    tok.quantizer.eval()
    assert torch.equal(tok.quantizer(z)[1], tok.quantizer.encode(z))       # deterministic argmax at eval
    assert "quantizer._draws" in _generators(tok)                          # saved with the Trainer's checkpoints


def _train(cfg: VideoConfig, x: torch.Tensor, steps: int) -> VideoTokenizer:
    tok = VideoTokenizer(cfg)
    opt = torch.optim.Adam(tok.parameters(), 3e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    tok.train()
    for _ in range(steps):
        out = tok(x[torch.randint(x.shape[0], (8,), generator=g)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return tok.eval()


def test_the_joint_prior_learns_to_predict_the_tokens():
    """Trained jointly, the prior's held-out next-token loss on the tokenizer's (argmax) tokens falls
    well below an untrained prior's on the same tokens."""
    small = dataclasses.replace(TINY, width=16, num_queries=6, prior_width=16)
    held = clips(16, 1)
    untrained = VideoTokenizer(small)
    tok = _train(small, clips(48, 0), 25)
    with torch.no_grad():
        z = tok.quantizer.decode(tok.encode_tensor(held))
        before = float(untrained.prior.loss(z, tok.encode_tensor(held))) / math.log(2)
    after = tok.prior_bits_per_token(held)
    assert after < before - 1.0, (before, after)


def test_save_load_keeps_the_prior_and_the_config(tmp_path):
    tok = _train(TINY, clips(32, 0), 3)
    x = clips(6, 2)
    tok.save(str(tmp_path / "tok"))
    back = load_tokenizer(str(tmp_path / "tok"))
    assert back.config == tok.config and back.config.quantizer == "svq" and back.config.prior_weight == 0.5
    assert torch.equal(back.encode_batch(x), tok.encode_batch(x))
    assert back.prior_bits_per_token(x) == pytest.approx(tok.prior_bits_per_token(x), abs=1e-6)
    with pytest.raises(ValueError, match="no prior"):
        VideoTokenizer(dataclasses.replace(TINY, prior_weight=0.0)).prior_bits_per_token(x)


@pytest.mark.parametrize("field, value, message", [
    ("prior_weight", "-0.1", r"model.prior_weight: must be a finite number >= 0"),
    ("prior_weight", "abc", r"model.prior_weight"),
    ("quantizer", "vq", r"model.quantizer: expected 'fsq' or 'svq'"),
    ("svq_temperature", "-1", r"model.svq_temperature: must be a finite number >= 0"),
    ("codebook_size", "1", r"model.codebook_size: must be >= 2"),
    ("prior_heads", "3", r"model.prior_width: 64 is not divisible by prior_heads 3"),
    ("num_queries", "-4", r"model.num_queries: must be >= 0"),
    ("svq_revive_after", "-1", r"model.svq_revive_after: must be >= 0"),
])
def test_config_errors_name_the_field(tmp_path, field, value, message):
    import yaml

    from mmfm.typed_config import packaged_config

    shipped = packaged_config("tokenizers/video_larp_small.yaml")
    assert load_config(shipped).model.prior_weight > 0
    doc = yaml.safe_load(open(shipped))
    doc["model"][field] = yaml.safe_load(value)
    bad = tmp_path / "v.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        load_config(str(bad))


# ---------------------------------------------------------------------------- dead-code revival
def test_svq_revival_moves_unused_codes_onto_batch_latents_and_keeps_the_used_ones():
    """Latents on 3 tight clusters: at the argmax only ~3 codes are ever drawn. With revive_after 2,
    after the third step every code no draw picked sits on one of that step's latents, the drawn
    codes are untouched, and the revived codes then take draws (more codes used)."""
    from mmfm.tokenizers.larp import StochasticVQ

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    z = (centres[torch.randint(3, (256,), generator=g)] + 0.05 * torch.randn(256, 8, generator=g))
    plain = StochasticVQ(8, 64, temperature=0.0, beta=0.25, seed=1)
    rev = StochasticVQ(8, 64, temperature=0.0, beta=0.25, seed=1, revive_after=2)
    assert torch.equal(plain.codebook, rev.codebook)
    rows = torch.nn.functional.normalize(z, dim=-1)
    used = set()
    for step in range(2):
        before = rev.codebook.detach().clone()
        idx = rev(z)[1]
        used |= set(idx.unique().tolist())
    moved = ~torch.isclose(before, rev.codebook.detach()).all(-1)
    assert rev.revived == int(moved.sum()) > 0
    assert not moved[idx.unique()].any()                     # this step's drawn codes stay
    d = (rev.codebook.detach()[moved][:, None] - rows[None]).norm(dim=-1)   # each moved code is a batch latent
    assert float(d.min(-1).values.max()) < 1e-5
    assert len(idx.unique()) <= 4 and len(plain(z)[1].unique()) <= 4
    after = rev(z)[1].unique().numel()
    assert after > 3 * len(idx.unique()), after               # revived codes now take latents
    assert rev.revived <= 64 - after                         # codes drawn in this step are never revived
    rev.eval()
    out = rev(z)                                            # eval: no revival, no state change
    assert torch.equal(out[1], rev.encode(z))


def test_svq_revival_state_is_saved_and_absent_when_off(tmp_path):
    on = VideoTokenizer(dataclasses.replace(TINY, svq_revive_after=5))
    off = VideoTokenizer(TINY)
    assert {"quantizer.train_step", "quantizer.last_used"} <= set(on.state_dict())
    assert not {"quantizer.train_step", "quantizer.last_used"} & set(off.state_dict())
    assert "quantizer._revive_draws" in _generators(on)
    tok = _train(dataclasses.replace(TINY, svq_revive_after=2), clips(32, 0), 4)
    assert int(tok.quantizer.train_step) == 4
    tok.save(str(tmp_path / "tok"))
    back = load_tokenizer(str(tmp_path / "tok"))
    assert torch.equal(back.quantizer.last_used, tok.quantizer.last_used)
    x = clips(6, 2)
    assert torch.equal(back.encode_batch(x), tok.encode_batch(x))
