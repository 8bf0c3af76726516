"""DSIR selection prefers raw samples that look like the target."""
import json

import numpy as np
import webdataset as wds

from mmfm.data.select import dsir_select, gumbel_top_k
from mmfm.data.writer import SampleShardWriter

PHYSICS = "fluid flow vorticity viscosity heat diffusion shock wave pressure field energy decay turbulence".split()
COOKING = "onion garlic butter simmer recipe oven flour sugar bake pan salt pepper taste dinner".split()


def texts(words, n, rng, length=12):
    return [" ".join(rng.choice(words, length)) for _ in range(n)]


def write(folder, docs, prefix):
    with SampleShardWriter(str(folder), prefix=prefix, shard_size=50) as w:
        for i, (tag, doc) in enumerate(docs):
            w.write({"__key__": f"{tag}_{i:04d}", "txt": doc,
                     "json": {"modality": "text", "source": "test", "license": "CC0-1.0"}})


def test_target_like_samples_are_preferred(tmp_path, capsys):
    from mmfm.cli import main

    rng = np.random.default_rng(0)
    mixed = [w for pair in zip(PHYSICS, COOKING) for w in pair]
    write(tmp_path / "target", [("t", d) for d in texts(PHYSICS, 40, rng)], "target")
    raw = [("phys", d) for d in texts(PHYSICS, 30, rng)] + [("cook", d) for d in texts(COOKING, 60, rng)] + \
          [("mix", d) for d in texts(mixed, 30, rng)]
    write(tmp_path / "raw", raw, "raw")
    with SampleShardWriter(str(tmp_path / "raw"), prefix="notext") as w:  # a sample that cannot be scored
        w.write({"__key__": "img", "png": np.zeros((2, 2), np.uint8),
                 "json": {"modality": "image", "source": "t", "license": "t", "width": 2, "height": 2}})
    rc = main(["data", "select", "--target", str(tmp_path / "target"), "--raw", str(tmp_path / "raw"),
               "--out", str(tmp_path / "sel"), "--k", "30"])
    assert rc == 0 and "selected 30 of 121" in capsys.readouterr().out
    keys = [r["__key__"] for r in wds.WebDataset(str(tmp_path / "sel" / "selected-000000.tar"), shardshuffle=False)]
    assert len(keys) == 30
    phys = sum(k.startswith("phys") for k in keys)
    assert phys >= 24 and not any(k.startswith("cook") for k in keys) and "img" not in keys  # raw has 30/121
    report = json.loads((tmp_path / "sel" / "select-report.json").read_text())
    assert report["raw_without_text"] == 1 and report["mean_log_weight_selected"] > report["mean_log_weight_raw"]


def test_gumbel_top_k_samples_proportionally_to_weights():
    w = np.log(np.array([8.0, 4.0, 2.0, 1.0, 1.0]))
    counts = np.zeros(5)
    rng = np.random.default_rng(0)
    for _ in range(4000):
        counts[gumbel_top_k(w, 1, rng)] += 1
    assert np.allclose(counts / counts.sum(), np.exp(w) / np.exp(w).sum(), atol=0.03)
    assert len(set(gumbel_top_k(w, 3, rng))) == 3


def test_selection_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    write(tmp_path / "t", [("t", d) for d in texts(PHYSICS, 10, rng)], "t")
    write(tmp_path / "r", [("r", d) for d in texts(PHYSICS + COOKING, 40, rng)], "r")
    a = dsir_select(str(tmp_path / "t"), str(tmp_path / "r"), 10, seed=3)["chosen"]
    b = dsir_select(str(tmp_path / "t"), str(tmp_path / "r"), 10, seed=3)["chosen"]
    assert list(a) == list(b)
