"""The scene and clip scorers name an object's colour from its core, so a decoder's blur does not
turn a yellow disc on black into an orange one; and the image tokenizer's object-weighted loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfm.data.demo_corpus.images import shape_scenes
from mmfm.eval.labels import scene_label
from mmfm.eval.scorers import palette


def _blurred_small_objects(seed: int, n: int = 60):
    """One-object 32-pixel scenes with a small object, blurred as a tokenizer decoder blurs them
    (a 5-tap Gaussian, sigma 1 pixel), with their labelled object colours."""
    rng = np.random.default_rng(seed)
    out = []
    for s in shape_scenes(4 * n, 32, rng, objects=(1.0,)):
        lab = scene_label(s)
        if lab is None or "small" not in s["txt"]:
            continue
        img = torch.from_numpy(np.asarray(s["png"], np.float32) / 255).permute(2, 0, 1)
        out.append((img, lab["colour"]))
        if len(out) == n:
            break
    k = torch.exp(-torch.arange(-2, 3.0) ** 2 / 2)
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 5, 5)
    imgs = torch.stack([i for i, _ in out])
    blurred = F.conv2d(F.pad(imgs, (2, 2, 2, 2), mode="replicate"), k, groups=3)
    return imgs, blurred, [c for _, c in out]


def _read(imgs, core: float | None):
    names = []
    for img in imgs:
        bg = palette.background_colour(img)
        mask = palette.object_mask(img, bg)
        if core is None:
            names.append(palette.object_colour(img, mask, bg))
        else:   # the median over the whole mask (core = 1), the scorer before this change
            px = img.permute(1, 2, 0)[mask]
            names.append(palette.colour_name(px.median(0).values) if len(px) else "none")
    return names


@pytest.mark.parametrize("seed", [0, 1])
def test_blurred_small_objects_keep_their_colour_read_from_the_core(seed):
    sharp, blurred, want = _blurred_small_objects(seed)
    acc = lambda got: float(np.mean([g == w for g, w in zip(got, want)]))
    assert acc(_read(sharp, None)) == 1.0                # a sharp render reads the same either way
    assert acc(_read(sharp, 1.0)) == 1.0
    core, whole = acc(_read(blurred, None)), acc(_read(blurred, 1.0))
    assert core >= 0.9, core
    assert whole <= core - 0.15, (whole, core)           # the rim of mixtures misleads the whole-mask median


def test_object_colour_without_object_pixels_is_none():
    img = torch.full((3, 32, 32), 0.5)
    bg = palette.background_colour(img)
    assert palette.object_colour(img, palette.object_mask(img, bg), bg) == "none"


def test_object_weighted_loss_weighs_object_pixels():
    from mmfm.tokenizers.pixel_loss import object_pixels, reconstruction_loss

    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 2:4, 2:4] = 1.0                               # a 4-pixel white object on black
    assert object_pixels(x).sum() == 4
    err_obj = x.clone(); err_obj[0, :, 2, 2] = 0.5        # the same error on an object pixel ...
    err_bg = x.clone(); err_bg[0, :, 6, 6] = 0.5          # ... and on a background pixel
    for kind in ("mse", "l1"):
        assert torch.isclose(reconstruction_loss(err_obj, x, kind), reconstruction_loss(err_bg, x, kind))
        w_obj, w_bg = reconstruction_loss(err_obj, x, kind, 4.0), reconstruction_loss(err_bg, x, kind, 4.0)
        assert torch.isclose(w_obj / w_bg, torch.tensor(5.0))
    assert torch.isclose(reconstruction_loss(err_bg, x, "l1"), (err_bg - x).abs().mean())


@pytest.mark.parametrize("field, value, message", [("recon_loss", "huber", "recon_loss"),
                                                  ("object_weight", -1.0, "object_weight")])
def test_bad_loss_fields_are_named(field, value, message):
    from mmfm.tokenizers.image import ImageConvConfig

    with pytest.raises(ValueError, match=message):
        ImageConvConfig(**{field: value}).validate()


def test_object_pixels_of_a_clip_use_the_clip_median():
    from mmfm.tokenizers.pixel_loss import object_pixels

    clip = torch.zeros(2, 3, 3, 8, 8)
    for t in range(3):
        clip[0, t, 0, 1, 1 + 2 * t] = 1.0                  # a red pixel moving right on black
    m = object_pixels(clip)
    assert m.shape == (2, 3, 1, 8, 8)
    assert m[0].sum() == 3 and m[1].sum() == 0
    assert all(m[0, t, 0, 1, 1 + 2 * t] == 1 for t in range(3))
