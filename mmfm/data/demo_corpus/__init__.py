"""`mmfm data demo --out DIR [--scale S]`: the six-modality demo corpus, offline, in under 2 minutes.

Every sample's .json records its source and license. Counts scale with S (at least one each).
Shards go to DIR as `<modality>-000000.tar` (one prefix per modality, so a mixture can name
`DIR/image-*.tar`), with a manifest per modality and `demo-summary.json`. Video is stored as MP4
and physics goes through HDF5 files in DIR/raw/physics and `mmfm data build`, the paths user data takes.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import numpy as np

from mmfm.data.writer import SampleShardWriter
from mmfm.jsonio import write_json


def demo_plan(scale: float, counts: dict | None = None) -> dict:
    """Samples per source at `scale`; `counts` sets some sources' numbers outright (the demo's preset
    asks for many more scenes, clips and shapes than documents: docs/training.md says why). "heat"
    (0 unless counted) adds 2D heat runs to the mixed physics runs; "code" (0 unless counted) adds
    standard-library Python source as text documents (text.code_samples)."""
    n = lambda base: max(1, int(round(base * scale)))  # noqa: E731
    plan = {"text": n(1000), "digits": n(500), "scenes": n(1000), "speech": n(48), "tones": n(100),
            "clips": n(200), "shapes": n(200), "physics": n(24), "heat": 0, "code": 0}
    for k, v in (counts or {}).items():
        if k not in plan:
            raise ValueError(f"demo corpus counts: unknown source {k!r} (expected one of {', '.join(plan)})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"demo corpus counts: {k} must be an integer >= 0, got {v!r}")
        plan[k] = v
    return plan


def demo_sources(scale: float, seed: int, counts: dict | None = None, scene_objects: tuple | None = None):
    from mmfm.data.demo_corpus import audio, images, physics, shapes3d, text, video

    plan = demo_plan(scale, counts)
    rng = np.random.default_rng(seed)
    return {
        "text": itertools.chain(text.text_samples(plan["text"]), text.code_samples(plan["code"])),
        "image": itertools.chain(images.bundled_photos(128),
                                 images.digits(plan["digits"], 32), images.shape_scenes(plan["scenes"], 64, rng, scene_objects)),
        "audio": itertools.chain(audio.speech(plan["speech"]), audio.tones(plan["tones"], rng)),
        "video": video.clips(plan["clips"], 64, 16, rng),
        "shape3d": shapes3d.shapes(plan["shapes"], 1024, rng),
        # "heat": extra 2D heat runs (8 ms each to solve), the physics the demo's tokenizer takes
        "physics": itertools.chain(physics.trajectories(plan["physics"], rng, grid=64, frames=16),
                                   physics.trajectories(plan["heat"], rng, grid=64, frames=16, kinds=("heat",),
                                                        start=plan["physics"])),
    }


def build_demo(out: str, scale: float = 1.0, seed: int = 0, shard_size: int = 100, progress: bool = True,
               counts: dict | None = None, scene_objects: tuple | None = None) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = {}
    for modality, samples in demo_sources(scale, seed, counts, scene_objects).items():
        t = time.perf_counter()
        if modality == "physics":
            manifest = _physics_through_build(samples, out, shard_size, progress)
        else:
            with SampleShardWriter(out, prefix=modality, shard_size=shard_size) as w:
                for s in tqdm(samples, desc=f"demo {modality}", unit="sample", file=sys.stderr, disable=not progress):
                    w.write(s)
            manifest = w.manifest
        summary[modality] = {"samples": manifest["samples"], "shards": len(manifest["shards"]),
                             "bytes": manifest["bytes"], "seconds": round(time.perf_counter() - t, 2)}
    summary["_total"] = {"samples": sum(v["samples"] for v in summary.values()), "seconds":
                         round(time.perf_counter() - t0, 2), "scale": scale, "seed": seed,
                         "counts": demo_plan(scale, counts)}
    write_json(os.path.join(out, "demo-summary.json"), summary)
    return summary


def _physics_through_build(samples, out: str, shard_size: int, progress: bool) -> dict:
    """Trajectories -> HDF5 files in <out>/raw/physics -> shards, by `mmfm data build`'s code."""
    from mmfm.data.build import BuildOptions, build_shards
    from mmfm.data.demo_corpus.physics import write_raw

    raw = os.path.join(out, "raw", "physics")
    write_raw(samples, raw)
    summary = build_shards("physics", raw, out, options=BuildOptions(shard_size=shard_size, prefix="physics",
                                                                      progress=progress))
    if summary.problems:
        raise RuntimeError(f"demo physics: {len(summary.problems)} trajectories failed to build: {summary.problems[:3]}")
    return summary.manifest


def main(args) -> int:
    if args.scale <= 0:
        print(f"mmfm data demo: --scale must be > 0, got {args.scale}", file=sys.stderr)
        return 2
    summary = build_demo(args.out, args.scale, args.seed, progress=not args.quiet)
    print(f"{'modality':<10} {'samples':>8} {'shards':>7} {'MB':>8} {'s':>6}")
    for m, v in summary.items():
        if not m.startswith("_"):
            print(f"{m:<10} {v['samples']:>8} {v['shards']:>7} {v['bytes'] / 1e6:>8.2f} {v['seconds']:>6.1f}")
    tot = summary["_total"]
    print(f"{'total':<10} {tot['samples']:>8} {'':>7} {'':>8} {tot['seconds']:>6.1f}   -> {args.out}")
    return 0
