"""The image tokenizer's local encoder (model.norm: channel, model.padding: replicate): a flat region
gets one latent wherever it is and whatever else the image holds. The old encoder (GroupNorm, zero
padding) fails both properties; the tests check that too, so they can tell the two apart."""
import pytest
import torch

from mmfm.tokenizers import ConfigError, load_config
from mmfm.tokenizers.image import ImageConvConfig, ImageConvTokenizer


def _tok(norm: str, padding: str, seed: int = 0) -> ImageConvTokenizer:
    # 64 px with 2 downsamples: the encoder's receptive field (40 px) does not reach from one corner
    # of the image to the opposite corner's latent
    return ImageConvTokenizer(ImageConvConfig(image_size=64, channels=16, downsamples=2, latent_dim=8,
                                              norm=norm, padding=padding, seed=seed)).eval()


def _flat(colour, size: int = 64) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32)[None, :, None, None].expand(1, 3, size, size).clone()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_flat_image_has_one_latent_everywhere_only_with_replicate_padding(seed):
    x = _flat((0.1, 0.7, 0.2))
    with torch.no_grad():
        local = _tok("channel", "replicate", seed).latents(x)
        old = _tok("group", "zeros", seed).latents(x)
    assert (local - local[:, :1, :1]).abs().max() < 1e-5
    assert (old - old[:, :1, :1]).abs().max() > 1e-3     # zero padding makes the border differ


@pytest.mark.parametrize("seed", [0, 1])
def test_a_far_away_object_does_not_change_a_background_latent_with_the_channel_norm(seed):
    a = _flat((0.1, 0.7, 0.2))
    b = a.clone()
    b[:, :, :8, :8] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]   # a red object in the top-left corner
    with torch.no_grad():
        for norm, padding, same in (("channel", "replicate", True), ("group", "replicate", False)):
            tok = _tok(norm, padding, seed)
            za, zb = tok.latents(a), tok.latents(b)
            far = (za[:, -1, -1] - zb[:, -1, -1]).abs().max()      # the bottom-right latent
            near = (za[:, 0, 0] - zb[:, 0, 0]).abs().max()
            assert near > 1e-3                                     # the object's own latent changes
            # GroupNorm's statistics span the image: the object moves every latent
            assert (far < 1e-5) if same else (far > 1e-4), (norm, padding, float(far))


def test_norm_and_padding_are_checked_and_default_to_the_saved_tokenizers_encoder(tmp_path):
    c = ImageConvConfig()
    assert (c.norm, c.padding) == ("group", "zeros")
    p = tmp_path / "t.yaml"
    p.write_text("tokenizer: image_conv\nmodel: {norm: batch}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.norm: expected one of group, channel, got 'batch'"):
        load_config(str(p))
    p.write_text("tokenizer: image_conv\nmodel: {padding: reflect}\n")
    with pytest.raises(ConfigError, match=r"model\.padding: expected one of zeros, replicate"):
        load_config(str(p))


def test_the_local_encoder_round_trips_through_save_and_load(tmp_path):
    from mmfm.tokenizers import load_tokenizer

    tok = _tok("channel", "replicate")
    tok.save(str(tmp_path / "tok"))
    back = load_tokenizer(str(tmp_path / "tok"))
    assert (back.config.norm, back.config.padding) == ("channel", "replicate")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.encode_batch(x), tok.encode_batch(x))
