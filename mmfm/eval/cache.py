"""Fitted scorers, cached next to the corpus (<corpus>/.scorers/<key>/<set>.npz by default), so they
are fitted once per corpus. The key hashes the corpus' summary and manifests (what was generated,
how many, which shards) and SCORER_VERSION (bump it when features or fitting change)."""
from __future__ import annotations

import glob
import hashlib
import os

from mmfm.eval.scorers.audio import ToneScorer
from mmfm.eval.scorers.image import DigitScorer, SceneScorer, as_image
from mmfm.eval.scorers.linear import LinearClassifier
from mmfm.eval.scorers.shape3d import PrimitiveScorer, as_points
from mmfm.eval.scorers.video import ClipScorer

SCORER_VERSION = 2

# prompt set -> (scorer class, how a corpus sample becomes the scorer's input, attribute holding the classifier)
FITTED = {
    "digits": (DigitScorer, as_image, "clf"),
    "scenes": (SceneScorer, as_image, "shape_clf"),
    "tones": (ToneScorer, None, "clf"),
    "shapes": (PrimitiveScorer, as_points, "clf"),
}


def corpus_key(folder: str) -> str:
    h = hashlib.sha1(f"scorers v{SCORER_VERSION}".encode())
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _as_wave(sample):
    from mmfm.eval.scorers.audio import as_wave

    return as_wave(sample)


def fit_scorer(name: str, train: list):
    """Fit the scorer of prompt set `name` on its training (sample, labels) pairs."""
    if name == "clips":
        return ClipScorer()
    cls, conv, _ = FITTED[name]
    conv = conv or _as_wave
    if not train:
        raise ValueError(f"scorer {name!r}: the corpus has no labelled training samples for it")
    return cls.fit([conv(s) for s, _ in train], [lab for _, lab in train])


def scorer(name: str, train: list, corpus_folder: str, cache_dir: str | None = None):
    """The fitted scorer of set `name`, from the cache when there, else fitted and cached.
    cache_dir=None: <corpus>/.scorers; "" disables the cache."""
    if name not in FITTED:
        return fit_scorer(name, train)
    cls, _, attr = FITTED[name]
    folder = os.path.join(os.path.join(corpus_folder, ".scorers") if cache_dir is None else cache_dir,
                          corpus_key(corpus_folder)) if cache_dir != "" else None
    path = os.path.join(folder, f"{name}.npz") if folder else None
    if path and os.path.exists(path):
        return cls(LinearClassifier.load(path))
    obj = fit_scorer(name, train)
    if path:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.npz")
        getattr(obj, attr).save(tmp)
        os.replace(tmp, path)
    return obj
