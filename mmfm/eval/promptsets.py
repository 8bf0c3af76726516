"""The prompt sets: which corpus samples each modality's eval prompts come from, their labels, and
the training samples the scorers are fitted on.

A sample is held out exactly as `mmfm demo e2e` holds it out of the model's token shards
(mmfm.tokenizers.data.is_held_out(key, 0.1)); scorers are fitted on the rest. The demo corpus
holds few held-out samples of some kinds (at scale 0.5: 4 tones, 5 moving clips, no 2D physics
run at all), so each set is topped up to `n` with NEW samples drawn from the same generators
(mmfm.data.demo_corpus) with another seed: real data of the corpus' distribution that neither the model
nor the scorers have seen. Each item records where it came from ("held-out" or "fresh").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mmfm.eval import labels as L

HOLDOUT_FRACTION = 0.1   # mmfm.demos.e2e.tokenize_corpus's split of the model's training tokens
FRESH_SEED_OFFSET = 1_000_003


@dataclass
class Item:
    prompt: str
    sample: dict
    labels: dict
    source: str          # "held-out" (in the corpus, not trained on) or "fresh" (drawn anew)


@dataclass
class PromptSet:
    name: str                       # digits, scenes, clips, tones, shapes, physics
    modality: str
    tasks: tuple
    items: list = field(default_factory=list)       # the eval prompts (held-out first, then fresh)
    train: list = field(default_factory=list)       # [(sample, labels)] the scorers fit on


def _digits_fresh(corpus_samples: list[dict], rng: np.random.Generator):
    from mmfm.data.demo_corpus.images import digits

    used = set()
    for s in corpus_samples:
        m = re.search(r"index (\d+)", str((s.get("json") or {}).get("source", "")))
        if m:
            used.add(int(m.group(1)))
    for s in digits(10_000, 32):
        idx = int(re.search(r"index (\d+)", s["json"]["source"]).group(1))
        if idx not in used:
            yield s


def _endless(make):
    """Batches of a seeded generator, forever (filtering decides how many are kept)."""
    def gen(_corpus, rng):
        while True:
            yield from make(rng)
    return gen


def _tones(rng):
    from mmfm.data.demo_corpus.audio import RATE, tones

    for s in tones(64, rng):   # written samples hold the raw array; a shard reader gives (array, rate)
        yield {**s, "wav": (np.asarray(s["wav"], np.float32)[:, None], RATE)}


def _scenes(rng):
    from mmfm.data.demo_corpus.images import shape_scenes

    yield from shape_scenes(64, 64, rng)


def _clips(rng):
    from mmfm.data.demo_corpus.video import clips

    yield from clips(32, 64, 16, rng)


def _shapes(rng):
    from mmfm.data.demo_corpus.shapes3d import shapes

    yield from shapes(16, 1024, rng)


def _physics_maker(grid: int, frames: int):
    def make(rng):
        from mmfm.data.demo_corpus.physics import trajectories

        yield from trajectories(6, rng, grid=grid, frames=frames)
    return make


def _moving(sample: dict) -> dict | None:
    lab = L.clip_label(sample)
    if lab and lab["motion"].startswith("moves"):
        return {**lab, "direction": lab["motion"]}
    return None


@dataclass(frozen=True)
class Spec:
    modality: str
    tasks: tuple
    label: Callable
    fresh: Callable


SPECS = {
    "digits": Spec("image", ("digit",), L.digit_label, _digits_fresh),
    "scenes": Spec("image", ("colour", "shape", "position"), L.scene_label, _endless(_scenes)),
    "clips": Spec("video", ("colour", "direction"), _moving, _endless(_clips)),
    "tones": Spec("audio", ("tone",), L.tone_label, _endless(_tones)),
    "shapes": Spec("shape3d", ("primitive",), L.shape_label, _endless(_shapes)),
}
MODALITY_SETS = {"image": ("digits", "scenes"), "video": ("clips",), "audio": ("tones",), "shape3d": ("shapes",),
                 "physics": ("physics",), "text": ()}


class Corpus:
    """A demo corpus folder, read once: every modality's decoded samples."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--corpus {folder!r}: no such folder (a demo corpus from mmfm data demo / "
                                    "mmfm demo e2e, e.g. runs/demo/corpus)")
        self.folder = folder
        self._samples: dict[str, list] = {}
        self.seed = 0
        summary = os.path.join(folder, "demo-summary.json")
        if not os.path.exists(summary):
            raise FileNotFoundError(f"--corpus {folder!r}: no demo-summary.json; expected a demo corpus "
                                    "(mmfm data demo --out DIR)")
        with open(summary) as f:
            self.summary = json.load(f)
        self.seed = int(self.summary.get("_total", {}).get("seed", 0))

    def samples(self, modality: str) -> list[dict]:
        if modality not in self._samples:
            import glob

            from mmfm.tokenizers.data import read_samples

            pattern = os.path.join(self.folder, f"{modality}-*.tar")
            self._samples[modality] = read_samples(pattern, modality, "all") if glob.glob(pattern) else []
        return self._samples[modality]

    def split(self, modality: str) -> tuple[list[dict], list[dict]]:
        """(training, held-out) samples of a modality, sorted by key within each."""
        from mmfm.tokenizers.data import is_held_out

        train, held = [], []
        for s in sorted(self.samples(modality), key=lambda s: s["__key__"]):
            (held if is_held_out(s["__key__"], HOLDOUT_FRACTION) else train).append(s)
        return train, held

    def fresh_rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed + FRESH_SEED_OFFSET, sum(map(ord, name))])


def build_set(corpus: Corpus, name: str, n: int, accept: Callable | None = None) -> PromptSet:
    """The prompt set `name` with n items; accept(sample) narrows it further (e.g. to the fields the
    physics tokenizer takes)."""
    spec = SPECS[name]
    ok = lambda s: accept is None or accept(s)  # noqa: E731
    train, held = corpus.split(spec.modality)
    ps = PromptSet(name, spec.modality, spec.tasks)
    ps.train = [(s, lab) for s in train if ok(s) and (lab := spec.label(s))]
    ps.items = [Item(s["txt"], s, lab, "held-out") for s in held if ok(s) and (lab := spec.label(s))][:n]
    fresh = spec.fresh(corpus.samples(spec.modality), corpus.fresh_rng(name))
    tries = 0
    while len(ps.items) < n:
        s = next(fresh, None)
        tries += 1
        if s is None or tries > 100 * n + 1000:
            raise RuntimeError(f"prompt set {name!r}: the demo generators gave {len(ps.items)} usable samples, "
                               f"fewer than n={n}")
        if ok(s) and (lab := spec.label(s)):
            ps.items.append(Item(s["txt"], {**s, "__key__": "fresh_" + s["__key__"]}, lab, "fresh"))
    return ps


def physics_set(corpus: Corpus, n: int, accept: Callable) -> PromptSet:
    """2D runs the physics tokenizer takes: held-out corpus runs, then new solver runs at the corpus'
    grid and frame count. Labels are empty: the truth is the run itself."""
    train, held = corpus.split("physics")
    ps = PromptSet("physics", "physics", ("continuation",))
    ps.train = [(s, {}) for s in train if accept(s)]
    ps.items = [Item(s["txt"], s, {}, "held-out") for s in held if accept(s) and isinstance(s.get("txt"), str)][:n]
    like = [s for s in train + held if accept(s)][:1]
    if not like:
        return ps
    fields = np.asarray(like[0]["npz"]["fields"])     # fresh runs at the grid and length the tokenizer took
    fresh = _endless(_physics_maker(int(fields.shape[-1]), int(fields.shape[0])))(None, corpus.fresh_rng("physics"))
    tries = 0
    while len(ps.items) < n and tries < 6 * n:
        s = next(fresh)
        tries += 1
        if accept(s):
            ps.items.append(Item(s["txt"], {**s, "__key__": "fresh_" + s["__key__"]}, {}, "fresh"))
    return ps
