"""`mmfm tokenize`: raw shards -> token shards with workers; a killed run resumes shard by shard
without duplicating or losing a sample (real SIGKILLs at the two points that matter)."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from mmfm.cli import main
from mmfm.data.synthetic import synthetic_sample
from mmfm.data.video import encode_mp4
from mmfm.data.writer import SampleShardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SHARDS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmfm.tokenizers import build_tokenizer
    from mmfm.tokenizers.audio import AudioConfig
    from mmfm.tokenizers.image import ImageConvConfig
    from mmfm.tokenizers.text import TextConfig, TextTokenizer
    from mmfm.tokenizers.video import VideoConfig

    root = tmp_path_factory.mktemp("tok")
    toks = {
        "image": build_tokenizer("image_conv", ImageConvConfig(image_size=16, channels=8, downsamples=2, codebook_size=32)),
        "audio": build_tokenizer("audio_codec", AudioConfig(clip_samples=1280, channels=8, latent_dim=8,
                                                            codebook_size=32, num_levels=2)),
        "video": build_tokenizer("video", VideoConfig(frames=5, image_size=16, width=16, depth=1, heads=2,
                                                      fsq_levels=[4, 4])),
    }
    words = ["red", "green", "blue", "circle", "square", "a", "the", "small", "large", "sound", "of", "wave"]
    rng = np.random.default_rng(0)
    toks["text"] = TextTokenizer(TextConfig(vocab_size=300)).fit([" ".join(rng.choice(words, 8)) for _ in range(200)])
    for m, t in toks.items():
        t.save(str(root / "tokenizers" / m))
    raw = root / "raw"
    for s in range(N_SHARDS):
        with SampleShardWriter(str(raw), prefix=f"mix{s}", shard_size=100) as w:
            for i in range(4):
                w.write(synthetic_sample(("text", "image", "audio")[i % 3], 10 * s + i, size=16))
            frames = np.stack([np.full((16, 16, 3), 20 * t, np.uint8) for t in range(6 + s % 2)])
            w.write({"__key__": f"clip{s}", "mp4": frames, "txt": "a ramp",
                     "json": {"modality": "video", "source": "test", "license": "CC0-1.0", "fps": 8,
                              "num_frames": len(frames), "width": 16, "height": 16}})
            short = frames[:3]  # 3 frames: the tokenizer needs 5, so it is skipped and counted
            w.write({"__key__": f"short{s}", "mp4": short, "txt": "too short",
                     "json": {"modality": "video", "source": "test", "license": "CC0-1.0", "fps": 8,
                              "num_frames": 3, "width": 16, "height": 16}})
            w.write(synthetic_sample("shape3d", s, size=4))  # no shape3d tokenizer given: skipped, counted
    return root


def token_rows(out) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        for r in wds.WebDataset(path, shardshuffle=False):
            rows.append((r["__key__"], np.load(io.BytesIO(r["npy"])).tolist()))
    return rows


def tokenize(setup, out, *extra, env=None, check=True):
    cmd = [sys.executable, "-m", "mmfm.cli", "tokenize", "--tokenizers", str(setup / "tokenizers"),
           "--src", str(setup / "raw"), "--out", str(out), "--quiet", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert main(["tokenize", "--tokenizers", str(setup / "tokenizers"), "--src", str(setup / "raw"), "--out", str(out),
                 "--workers", "1", "--quiet"]) == 0
    return out


def test_every_modality_tokenized_report_and_skips(reference):
    rows = token_rows(reference)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)) == N_SHARDS * 5       # 4 synthetic + 1 clip per shard
    report = json.loads((reference / "tokens-report.json").read_text())
    m = report["modalities"]
    assert m["video"]["samples"] == N_SHARDS and m["video"]["skipped"] == N_SHARDS
    assert m["shape3d"]["skipped"] == N_SHARDS and report["skip_reasons"]["no shape3d tokenizer"] == N_SHARDS
    assert report["skip_reasons"]["video: VideoTooShort"] == N_SHARDS
    assert report["train_samples"] + report["eval_samples"] == len(keys)
    assert report["samples_per_s"] > 0 and report["shards"] == N_SHARDS
    vocab = json.loads((reference / "vocab.json").read_text())
    assert [r["modality"] for r in vocab["ranges"]] == ["text", "image", "audio", "video"]


def test_two_workers_write_the_same_tokens(setup, reference, tmp_path):
    tokenize(setup, tmp_path / "w2", "--workers", "2")
    assert sorted(token_rows(tmp_path / "w2")) == sorted(token_rows(reference))


@pytest.mark.parametrize("stage", ["written", "done"])
def test_a_killed_run_resumes_without_duplicates_or_losses(setup, reference, tmp_path, stage):
    out = tmp_path / "out"
    p = tokenize(setup, out, "--workers", "1", env={"MMFM_FAULT_TOKENIZE_KILL": f"3:{stage}"}, check=False)
    assert p.returncode == -9, p.stderr[-2000:]                 # SIGKILL: no cleanup ran
    markers = os.listdir(out / ".done")
    assert len(markers) == (2 if stage == "written" else 3)
    p = tokenize(setup, out, "--workers", "1")
    assert f"({len(markers)} already done)" in p.stdout
    assert sorted(token_rows(out)) == sorted(token_rows(reference))
    assert not glob.glob(str(out / "*.tmp"))
    report = json.loads((out / "tokens-report.json").read_text())
    assert report["resumed_shards"] == len(markers) and report["modalities"]["video"]["samples"] == N_SHARDS


def test_resume_with_other_tokenizers_is_refused(setup, reference, tmp_path, capsys):
    import shutil

    tok = tmp_path / "tokenizers"
    shutil.copytree(setup / "tokenizers", tok)
    shutil.rmtree(tok / "audio")
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    assert main(["tokenize", "--tokenizers", str(tok), "--src", str(setup / "raw"), "--out", str(out), "--quiet"]) == 2
    assert "other tokenizers" in capsys.readouterr().err
    shutil.rmtree(tok / "text")
    assert main(["tokenize", "--tokenizers", str(tok), "--src", str(setup / "raw"), "--out", str(out), "--quiet"]) == 2
    assert "no text tokenizer" in capsys.readouterr().err


def test_bench_tokenize_quick_writes_records(tmp_path):
    from mmfm.bench.tokenize import main as bench

    path = tmp_path / "t.json"
    assert bench(["--quick", "--samples", "8", "--modalities", "text,video", "--workers", "1", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert {(r["case"]["modality"], r["case"]["workers"]) for r in records} == {("text", 1), ("video", 1)}
    assert all(r["bench"] == "tokenize" and r["samples_per_s"] > 0 for r in records)
