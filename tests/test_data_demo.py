"""`mmfm data demo`: all six modalities, every sample with source and license, verified, fast."""
import json
import shutil
import time

import webdataset as wds

from mmfm.data.demo_corpus import build_demo
from mmfm.data.schema import MODALITIES
from mmfm.data.verify import verify_shards


def test_demo_default_scale_is_fast_complete_and_verifies(tmp_path, capsys):
    from mmfm.cli import main

    t0 = time.perf_counter()
    assert main(["data", "demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert time.perf_counter() - t0 < 120
    assert "total" in capsys.readouterr().out
    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    assert all(summary[m]["samples"] > 0 for m in MODALITIES)
    report = verify_shards(str(tmp_path), progress=False)
    assert report.ok, report.problems[:5]
    assert set(report.per_modality) == set(MODALITIES)
    for r in wds.WebDataset(str(tmp_path / "*.tar").replace("*", "{audio,image,physics}-000000"), shardshuffle=False):
        meta = json.loads(r["json"])
        assert meta["source"] and meta["license"]
        assert r["txt"]  # caption, transcript or description
    # video is stored as MP4, physics came from HDF5 files through `data build`, as user data does
    clip = next(iter(wds.WebDataset(str(tmp_path / "video-000000.tar"), shardshuffle=False)))
    assert "mp4" in clip and "npz" not in clip
    assert sorted(p.suffix for p in (tmp_path / "raw" / "physics").iterdir())[:1] == [".h5"]
    assert json.loads((tmp_path / "physics-build-report.json").read_text())["problems"] == []
    if shutil.which("espeak-ng"):
        speech = [r for r in wds.WebDataset(str(tmp_path / "audio-000000.tar"), shardshuffle=False)
                  if json.loads(r["json"])["kind"] == "speech"]
        assert speech and all(r["txt"] for r in speech)


def test_demo_is_deterministic_at_small_scale(tmp_path):
    a = build_demo(str(tmp_path / "a"), scale=0.02, progress=False)
    build_demo(str(tmp_path / "b"), scale=0.02, progress=False)
    assert a["physics"]["samples"] >= 1
    for m in ("image", "video", "shape3d", "physics"):
        assert (tmp_path / "a" / f"{m}-000000.tar").read_bytes() == (tmp_path / "b" / f"{m}-000000.tar").read_bytes()


def test_bench_data_quick_writes_records(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "data.json"
    out = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "data", "--quick", "--modalities", "image,audio",
                          "--formats", "mp4,flac,mp3,hdf5,glb,webp", "--json", str(path)],
                         capture_output=True, text=True, cwd=root, timeout=180)
    assert out.returncode == 0, out.stderr
    records = json.loads(path.read_text())
    readers = [r for r in records if "modality" in r["case"]]
    assert {(r["case"]["modality"], r["impl"]) for r in readers} == {
        ("image", "mmfm"), ("image", "webdataset"), ("audio", "mmfm"), ("audio", "webdataset")}
    assert all(r["bench"] == "data" and r["samples_per_s"] > 0 and r["mb_per_s"] > 0 for r in readers)
    formats = {(r["case"]["format"], r["impl"]) for r in records if "format" in r["case"]}
    assert formats == {("mp4", "mmfm"), ("mp4", "pyav"), ("flac", "mmfm"), ("flac", "soundfile"), ("mp3", "mmfm"),
                       ("mp3", "pyav"), ("hdf5", "mmfm"), ("hdf5", "h5py"), ("glb", "mmfm"), ("glb", "trimesh"),
                       ("webp", "mmfm"), ("webp", "pillow")}
    assert all(r["files_per_s"] > 0 for r in records if "format" in r["case"])


def test_demo_counts_set_sources_outright_and_name_a_bad_one(tmp_path):
    import pytest

    from mmfm.data.demo_corpus import demo_plan

    plan = demo_plan(0.02, {"scenes": 7, "physics": 4})
    assert plan["scenes"] == 7 and plan["physics"] == 4 and plan["digits"] == demo_plan(0.02)["digits"]
    s = build_demo(str(tmp_path), scale=0.02, progress=False, counts={"scenes": 7, "clips": 3})
    assert s["video"]["samples"] == 3 and s["_total"]["counts"]["scenes"] == 7
    with pytest.raises(ValueError, match="unknown source 'scene'"):
        demo_plan(1.0, {"scene": 3})
    with pytest.raises(ValueError, match="clips must be an integer >= 0"):
        demo_plan(1.0, {"clips": -1})
    heat = build_demo(str(tmp_path / "heat"), scale=0.02, progress=False, counts={"physics": 3, "heat": 4})
    assert heat["physics"]["samples"] == 7   # 3 mixed runs (heat, burgers, navier_stokes) + 4 heat: no key clash


def test_code_documents_are_stdlib_source_cut_at_lines(tmp_path):
    """counts={"code": N}: N text documents of standard-library source, each a run of whole lines
    of one file (every line of the document is a line of that file, in order), at most MAX_CHARS,
    distinct; 0 by default, so the demo's corpus does not change."""
    import os
    import sysconfig
    import tarfile

    from mmfm.data.demo_corpus import demo_plan
    from mmfm.data.demo_corpus.text import MAX_CHARS, MIN_CHARS, code_samples

    assert demo_plan(1.0)["code"] == 0
    docs = list(code_samples(40))
    assert len(docs) == 40 and len({d["txt"] for d in docs}) == 40
    root = sysconfig.get_paths()["stdlib"]
    for d in docs:
        assert MIN_CHARS <= len(d["txt"]) <= MAX_CHARS and d["json"]["license"] == "PSF-2.0"
        rel = d["json"]["source"].split(": ", 1)[1]
        with open(os.path.join(root, rel), encoding="utf-8") as fh:
            src = fh.read()
        assert d["txt"] in src                   # a contiguous piece of the file
        start = src.index(d["txt"])
        assert start == 0 or src[start - 1] in "\n \t"   # cut at a line boundary (pieces are stripped)
    s = build_demo(str(tmp_path), scale=0.02, progress=False, counts={"code": 5})
    assert s["text"]["samples"] == demo_plan(0.02)["text"] + 5
    keys = []
    for shard in sorted(f for f in os.listdir(tmp_path) if f.startswith("text-") and f.endswith(".tar")):
        with tarfile.open(os.path.join(tmp_path, shard)) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert sum(k.startswith("code_") for k in keys) == 5


def test_scene_object_weights_set_how_many_objects_a_scene_has():
    import numpy as np
    import pytest

    from mmfm.data.demo_corpus.images import shape_scenes

    def objects(caption: str) -> int:   # "a ... at the ..., a ... and a ... on a ... background"
        return caption.split(" on ")[0].count(" at the ")

    rng = np.random.default_rng(0)
    assert {objects(s["txt"]) for s in shape_scenes(40, 32, rng, objects=(1, 0, 0))} == {1}
    counts = np.bincount([objects(s["txt"]) for s in shape_scenes(600, 32, rng, objects=(0, 1, 3))], minlength=4)
    assert counts[1] == 0 and abs(counts[3] / 600 - 0.75) < 0.06
    # the default draws as the corpus always did: existing corpora stay bit-identical
    a = [s["txt"] for s in shape_scenes(20, 32, np.random.default_rng(1))]
    assert len({objects(c) for c in a}) == 3
    with pytest.raises(ValueError, match="scene objects"):
        next(shape_scenes(1, 32, rng, objects=(0, 0)))
