"""Fitted scorers, cached next to the corpus (<corpus>/.scorers/<key>/<set>-<tokenizer>.npz by
default), so they are fitted once per corpus and tokenizer. The key hashes the corpus' summary and
manifests (what was generated, how many, which shards) and SCORER_VERSION (bump it when features or
fitting change); <tokenizer> hashes the modality tokenizer's weights and config.

With a tokenizer, a scorer is fitted on the training samples twice over: as the tokenizer prepares
them and after its encode + decode round trip, each with the corpus' own label. Generated samples
come out of that decoder, and a decoder distorts systematically: on the demo export, a tone
scorer fitted on raw clips names 20% of round-tripped held-out tones, the same features fitted on
round-tripped clips 100%. The round trip is of real samples, so nothing is fitted on generated data."""
from __future__ import annotations

import glob
import hashlib
import os

from mmfm.eval.scorers.audio import ToneScorer, as_wave
from mmfm.eval.scorers.image import DigitScorer, SceneScorer, as_image
from mmfm.eval.scorers.linear import LinearClassifier
from mmfm.eval.scorers.shape3d import PrimitiveScorer, as_points
from mmfm.eval.scorers.video import ClipScorer

SCORER_VERSION = 2

# prompt set -> (scorer class, how a corpus sample becomes the scorer's input, attribute holding the classifier)
FITTED = {
    "digits": (DigitScorer, as_image, "clf"),
    "scenes": (SceneScorer, as_image, "shape_clf"),
    "tones": (ToneScorer, as_wave, "clf"),
    "shapes": (PrimitiveScorer, as_points, "clf"),
}


def corpus_key(folder: str) -> str:
    h = hashlib.sha1(f"scorers v{SCORER_VERSION}".encode())
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def tokenizer_key(tok) -> str:
    h = hashlib.sha1(f"{getattr(tok, 'registry_name', type(tok).__name__)} {getattr(tok, 'config', '')}".encode())
    for k, v in sorted(tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _round_trip_values(tok, samples: list, batch: int = 64) -> tuple[list, list]:
    """(prepared, round-tripped) scorer inputs of samples through tok (3D: xyz only)."""
    import torch

    x = torch.stack([tok.prepare(s) for s in samples])
    with torch.no_grad():
        r = torch.cat([tok.decode(tok.encode_batch(x[i:i + batch])) for i in range(0, len(x), batch)])
    cut = (lambda t: t[:, :3]) if tok.modality == "shape3d" else (lambda t: t)  # noqa: E731
    return [cut(t) for t in x], [cut(t) for t in r]


def fit_scorer(name: str, train: list, tok=None):
    """Fit the scorer of prompt set `name` on its training (sample, labels) pairs: on the raw samples,
    or with a tokenizer on the prepared and the round-tripped samples (module docstring)."""
    if name == "clips":
        return ClipScorer()
    cls, conv, _ = FITTED[name]
    if not train:
        raise ValueError(f"scorer {name!r}: the corpus has no labelled training samples for it")
    labels = [lab for _, lab in train]
    kw = {}
    if tok is None:
        values = [conv(s) for s, _ in train]
    else:
        raw, rt = _round_trip_values(tok, [s for s, _ in train])
        values, labels = raw + rt, labels + labels
        if name == "tones":
            kw["rate"] = int(tok.config.sample_rate)
    return cls.fit(values, labels, **kw)


def scorer(name: str, train: list, corpus_folder: str, cache_dir: str | None = None, tok=None):
    """The fitted scorer of set `name` (for tokenizer `tok`, see fit_scorer), from the cache when
    there, else fitted and cached. cache_dir=None: <corpus>/.scorers; "" disables the cache."""
    if name not in FITTED:
        return fit_scorer(name, train, tok)
    cls, _, attr = FITTED[name]
    folder = os.path.join(os.path.join(corpus_folder, ".scorers") if cache_dir is None else cache_dir,
                          corpus_key(corpus_folder)) if cache_dir != "" else None
    tag = "raw" if tok is None else tokenizer_key(tok)
    path = os.path.join(folder, f"{name}-{tag}.npz") if folder else None
    if path and os.path.exists(path):
        return cls(LinearClassifier.load(path))
    obj = fit_scorer(name, train, tok)
    if path:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.npz")
        getattr(obj, attr).save(tmp)
        os.replace(tmp, path)
    return obj
