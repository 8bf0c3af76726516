"""TokenBridge's per-dimension AR head (mmfm/tokenizers/tokenbridge_prior.py), post-training quantization
at several budgets, and the baselines of the rate-distortion eval (mmfm/tokenizers/rd.py, baselines.py)."""
import io

import numpy as np
import pytest
import torch

from mmfm.tokenizers.baselines import jpeg_abbreviated_size, pillow_at_bytes
from mmfm.tokenizers.metrics import psnr
from mmfm.tokenizers.tokenbridge import TokenBridgeConfig, TokenBridgeTokenizer
from mmfm.tokenizers.tokenbridge_prior import DimwiseARHead, train_prior


def test_head_slot_c_sees_only_earlier_channels():
    torch.manual_seed(0)
    head = DimwiseARHead(hidden=8, num_channels=5, num_bins=6, width=16)
    h, bins = torch.randn(3, 8), torch.randint(6, (3, 5))
    base = head.logits(h, bins)
    for c in range(5):
        other = bins.clone()
        other[:, c:] = (other[:, c:] + 1) % 6
        changed = head.logits(h, other)
        assert torch.allclose(changed[:, : c + 1], base[:, : c + 1], atol=1e-6)   # slot c: bins < c only
        if c + 1 < 5:
            assert not torch.allclose(changed[:, c + 1:], base[:, c + 1:])
    with pytest.raises(ValueError, match="bins must be"):
        head.logits(h, bins[:, :4])


def _dependent_tokens(n, seed, positions=8, nb=8):
    """Channel 0 uniform, channels 1 and 2 functions of it, channel 3 uniform: 2 x 3 bits per position."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(nb, (n, positions, 1), generator=g)
    t = torch.cat([a, (a + 1) % nb, (3 * a) % nb, torch.randint(nb, (n, positions, 1), generator=g)], 2)
    return t.reshape(n, -1)


def test_ar_head_learns_what_independent_channels_cannot():
    train, held = _dependent_tokens(384, 0), _dependent_tokens(96, 1)
    kw = dict(num_channels=4, num_bins=8, steps=70, width=32, depth=1, batch_size=32, lr=4e-3)
    ind = train_prior("independent", train, held, **kw)
    ar = train_prior("dimwise_ar", train, held, **kw)
    floor_ind, truth = 8 * 4 * 3, 8 * 2 * 3   # independent channels cannot go below 4 x 3 bits a position
    assert ind.bits_per_image > 0.97 * floor_ind
    assert ar.bits_per_image < 0.75 * floor_ind and ar.bits_per_image > 0.95 * truth
    assert ar.sequence_length == ind.sequence_length == 8 and ar.head_parameters > ind.head_parameters


def test_head_samples_follow_the_learned_dependence():
    torch.manual_seed(0)
    head = DimwiseARHead(hidden=4, num_channels=3, num_bins=5, width=32)
    opt = torch.optim.Adam(head.parameters(), 5e-3)
    for _ in range(80):
        a = torch.randint(5, (64, 1))
        bins = torch.cat([a, (a + 2) % 5, (4 * a) % 5], 1)
        loss = head.loss(torch.zeros(64, 4), bins)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = head.sample(torch.zeros(400, 4), generator=torch.Generator().manual_seed(0))
    assert ((s[:, 1] == (s[:, 0] + 2) % 5) & (s[:, 2] == (4 * s[:, 0]) % 5)).float().mean() > 0.9
    assert len(s[:, 0].unique()) == 5                      # the free channel stays spread over its bins


def test_more_bins_approach_the_continuous_reconstruction():
    tok = TokenBridgeTokenizer(TokenBridgeConfig(image_size=16, channels=8, downsamples=1, latent_dim=3, num_bins=4))
    x = torch.rand(24, 3, 16, 16)
    cont = tok.continuous_reconstruction(x)
    gaps = []
    for nb in (2, 8, 32):
        t = tok.with_bins(nb, x)
        assert t.vocab_size == nb and t.bits_per_sample == pytest.approx(t.tokens_per_sample * np.log2(nb))
        with torch.no_grad():
            gaps.append(float((t.decode_tensor(t.encode_tensor(x)) - cont).pow(2).mean()))
    assert gaps[0] > 3 * gaps[1] > 9 * gaps[2], gaps
    assert not bool(tok.bins.fitted)   # the original is left as it was: with_bins fits a copy


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(3, 32, 32)
    for _ in range(4):   # a few flat rectangles: something JPEG / WebP can spend bits on
        r, c, h, w = torch.randint(0, 24, (4,), generator=g).tolist()
        x[:, r:r + h // 2 + 2, c:c + w // 2 + 2] = torch.rand(3, 1, 1, generator=g)
    return x


def test_jpeg_shared_tables_size_is_the_per_image_part():
    from PIL import Image

    sizes = []
    for seed in (0, 1):
        buf = io.BytesIO()
        arr = (_image(seed).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(buf, "JPEG", quality=30)
        data = buf.getvalue()
        sizes.append((len(data), jpeg_abbreviated_size(data)))
    # same quality -> same tables: the difference (tables + APP0) is one constant, and most of a tiny file
    assert sizes[0][0] - sizes[0][1] == sizes[1][0] - sizes[1][1] > 400
    assert sizes[0][1] != sizes[1][1]
    with pytest.raises(ValueError, match="not a JPEG"):
        jpeg_abbreviated_size(b"\xff\xd8\x00\x00")


@pytest.mark.parametrize("fmt,abbrev", [("JPEG", True), ("WEBP", False)])
def test_codecs_stay_within_the_bytes_and_improve_with_them(fmt, abbrev):
    x = torch.stack([_image(s) for s in range(6)])
    out = []
    for budget in (150, 300, 600):
        r, used, q = pillow_at_bytes(x, budget, fmt, abbreviated=abbrev)
        assert r.shape == x.shape and max(used) <= budget
        out.append(psnr(x, r))
    assert out[0] < out[1] < out[2]
    r, used, q = pillow_at_bytes(x, 10, fmt, abbreviated=abbrev)   # nothing fits: lowest quality, over budget
    assert min(used) > 10 and set(q) == {0 if fmt == "WEBP" else 1}
