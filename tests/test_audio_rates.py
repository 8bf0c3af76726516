"""The audio codec at 50 / 25 / 12.5 frames per second (issue 19 item 6, LM-SPT's rates).

The shipped rate configs must spend the same bits per second (the comparison in docs/benchmarks.md
rests on it), the codec must emit frame_rate x levels tokens per second of audio and decode them
back to the clip's shape, and a rate that the strides or the sample rate cannot give must be
refused naming the field."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmfm.tokenizers.audio import AudioCodec, AudioConfig
from mmfm.tokenizers.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizers"
RATES = {"audio_codec_50hz": 50.0, "audio_codec_25hz": 25.0, "audio_codec_12hz": 12.5}


def tiny(rate: float, strides: list[int], levels: int, clip: int = 5120) -> AudioCodec:
    """Narrow codecs with the rate configs' hop structure: cheap, same lengths as the real ones."""
    return AudioCodec(AudioConfig(clip_samples=clip, channels=4, strides=strides, latent_dim=8, codebook_size=16,
                                  num_levels=levels, frame_rate_hz=rate))


@pytest.mark.parametrize("name,rate", sorted(RATES.items()))
def test_shipped_rate_configs_spend_equal_bits(name, rate):
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    tok = AudioCodec(cfg)
    assert tok.frame_rate_hz == rate == cfg.frame_rate_hz
    # the rate comparison's premise: 1600 bits/s and 200 tokens/s at every frame rate, the same clip
    assert tok.bits_per_second() == 1600.0
    assert tok.token_rate_hz == 200.0
    assert cfg.clip_samples == 10240 and tok.frames == round(rate * 10240 / 16000)
    # same four stages, so the widths (and the model's size class) do not change with the rate
    assert len(cfg.strides) == 4 and cfg.channels == 16 and cfg.latent_dim == 32


@pytest.mark.parametrize("rate,strides,levels", [(12.5, [4, 5, 8, 8], 4), (25.0, [4, 4, 5, 8], 2),
                                                 (50.0, [4, 4, 4, 5], 1)])
def test_tokens_per_second_and_round_trip_shapes(rate, strides, levels):
    tok = tiny(rate, strides, levels)
    seconds = 5120 / 16000
    x = torch.sin(torch.arange(5120)[None] * 0.03 * (1 + torch.arange(3)[:, None])) * 0.5
    with torch.no_grad():
        z = tok.latents(x)
    assert z.shape == (3, round(rate * seconds), 8)          # the encoder really downsamples to the rate
    ids = tok.encode_batch(x)
    assert ids.shape == (3, round(rate * levels * seconds))   # tokens per second = frame rate x levels
    assert ids.shape[1] / seconds == pytest.approx(tok.token_rate_hz)
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    y = tok.decode(ids)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # frame-major: the first level of every frame alone decodes to the same shape
    first = ids.reshape(3, tok.frames, levels)[..., :1].reshape(3, -1)
    assert tok.decode(first).shape == x.shape


@pytest.mark.parametrize("rate,strides,frame", [(12.5, [4, 5, 8, 8], 2), (25.0, [4, 4, 5, 8], 4)])
def test_a_click_lands_in_the_frame_of_its_time(rate, strides, frame):
    """Samples 2600-2640 lie in frame 2 at hop 1280 and frame 4 at hop 640: the latents that move
    must be that frame and its neighbours within the encoder's receptive field (two frames either
    side), the rest exactly unchanged. A codec whose hop is not sample_rate / rate would move
    frames elsewhere (or have another frame count). Two inits."""
    for seed in (0, 1):
        tok = AudioCodec(AudioConfig(clip_samples=10240, channels=4, strides=strides, latent_dim=8,
                                     codebook_size=16, num_levels=1, frame_rate_hz=rate, seed=seed))
        base = torch.zeros(1, 10240)
        click = base.clone()
        click[0, 2600:2640] = 0.9
        with torch.no_grad():
            d = (tok.latents(click) - tok.latents(base)).abs().sum(-1)[0]
        assert d.shape == (round(rate * 0.64),)
        moved = [i for i in range(len(d)) if float(d[i]) > 0]
        assert frame in moved and min(moved) >= frame - 2 and max(moved) <= frame + 2


@pytest.mark.parametrize("change,match", [
    ({"frame_rate_hz": 30.0}, r"frame_rate_hz: 30.0 Hz does not divide sample_rate 16000"),
    ({"frame_rate_hz": 25.0}, r"frame_rate_hz: 25.0 Hz needs a hop of 640 samples, but strides \[4, 4, 4, 5\]"),
    ({"frame_rate_hz": -1.0}, r"frame_rate_hz: expected frames per second"),
    ({"frame_rate_hz": 12.5, "strides": [4, 5, 8, 8], "clip_samples": 8000},
     r"clip_samples: 8000 is not a multiple of prod\(strides\) = 1280.*e\.g\. 7680"),
])
def test_bad_rate_is_refused_naming_the_field(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        AudioConfig(**change).validate()
    # and through a YAML file, the error names the file and the model field
    raw = yaml.safe_load((CONFIGS / "audio_codec_50hz.yaml").read_text())
    raw["model"].update(change)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"bad.yaml: model\.{match}"):
        load_config(bad)


def test_undeclared_rate_keeps_old_configs_working():
    cfg = load_config(CONFIGS / "audio_codec_small.yaml").model
    assert cfg.frame_rate_hz == 0.0
    assert AudioCodec(cfg).frame_rate_hz == 16000 / math.prod(cfg.strides) == 50.0
