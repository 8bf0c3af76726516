"""Image scorers: the digit a handwritten-digit image shows (logistic regression on 8 x 8 grey
pixels, fitted on the corpus' training digits), and for a one-object rendered scene the object's
colour and position (computed from the palette) and shape (logistic regression on the cropped
object mask, fitted on the corpus' training scenes)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmfm.data.demo_corpus.images import _where
from mmfm.eval.scorers import palette
from mmfm.eval.scorers.linear import LinearClassifier

FIT_SIZE = 32   # corpus images are brought to the demo image tokenizer's size before fitting


def as_image(sample) -> torch.Tensor:
    """A shard sample or a [3, H, W] tensor -> float [3, FIT_SIZE, FIT_SIZE] in [0, 1]."""
    from mmfm.tokenizers.image import image_to_tensor

    if isinstance(sample, torch.Tensor):
        return sample.float().clamp(0, 1)
    return image_to_tensor(sample, FIT_SIZE, "eval image scorer")


def digit_features(img: torch.Tensor) -> np.ndarray:
    """Grey level pooled to 8 x 8: the resolution of scikit-learn's digits, whatever the image size."""
    grey = img.float().clamp(0, 1).mean(0, keepdim=True)[None]
    return F.adaptive_avg_pool2d(grey, 8).reshape(-1).numpy()


class DigitScorer:
    tasks = ("digit",)

    def __init__(self, clf: LinearClassifier):
        self.clf = clf

    @classmethod
    def fit(cls, images: list[torch.Tensor], labels: list[dict]) -> "DigitScorer":
        x = np.stack([digit_features(i) for i in images])
        return cls(LinearClassifier.fit(x, [lab["digit"] for lab in labels], c=0.5, name="digit scorer"))

    def predict(self, images: list[torch.Tensor]) -> dict[str, list[str]]:
        return {"digit": self.clf.predict(np.stack([digit_features(i) for i in images]))}


def scene_parts(img: torch.Tensor) -> tuple[str, str, np.ndarray]:
    """(object colour, position phrase, mask features) of a one-object scene."""
    bg = palette.background_colour(img)
    mask = palette.object_mask(img, bg)
    c = palette.centroid(mask)
    where = _where(*c) if c is not None else "none"
    return palette.object_colour(img, mask, bg), where, palette.mask_features(mask)


class SceneScorer:
    tasks = ("colour", "shape", "position")

    def __init__(self, shape_clf: LinearClassifier):
        self.shape_clf = shape_clf

    @classmethod
    def fit(cls, images: list[torch.Tensor], labels: list[dict]) -> "SceneScorer":
        x = np.stack([scene_parts(i)[2] for i in images])
        return cls(LinearClassifier.fit(x, [lab["shape"] for lab in labels], c=1.0, name="scene shape scorer"))

    def predict(self, images: list[torch.Tensor]) -> dict[str, list[str]]:
        parts = [scene_parts(i) for i in images]
        return {"colour": [p[0] for p in parts], "position": [p[1] for p in parts],
                "shape": self.shape_clf.predict(np.stack([p[2] for p in parts]))}
