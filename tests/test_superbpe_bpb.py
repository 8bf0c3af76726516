"""tools/superbpe_bpb.py end to end at toy sizes: both arms fit their tokenizers, tokenize, pretrain
under DeepSpeed and score held-out bits per byte; the figures it writes are the ones `mmfm eval bpb`
gives for the same exports; a rerun only redoes what is missing; a bad corpus is named."""
import json
import os
import random
import subprocess
import sys

import pytest

from mmfm.data.synthetic import synthetic_sample
from mmfm.data.writer import SampleShardWriter
from mmfm.tokenizers.data import is_held_out

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "superbpe_bpb.py")
WORDS = ["value", "object", "module", "parser", "string", "the", "of", "returns", "a", "list"]
ARGS = ["--arms", "bpe,superbpe", "--seeds", "0", "--vocab-size", "400", "--transition", "310", "--steps", "4",
        "--micro-batch", "2", "--seq-len", "32", "--override", "model.n_layers=1"]


def _corpus(root: str) -> list[tuple[str, str]]:
    rng = random.Random(5)
    # phrases repeat, so superwords (merges across the space) have something to find
    phrases = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(12)]
    docs = [(f"d{i:04d}", "\n".join(" ".join(rng.choice(phrases) for _ in range(rng.randint(2, 5)))
                                     for _ in range(rng.randint(2, 4)))) for i in range(120)]
    with SampleShardWriter(root, prefix="text", shard_size=40) as w:
        for i, (key, d) in enumerate(docs):
            w.write({"__key__": key, "txt": d, "json": synthetic_sample("text", i)["json"]})
    return docs


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_superbpe_bpb_runs_both_arms_and_reports_what_eval_bpb_measures(tmp_path):
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    docs = _corpus(corpus)
    r = _run(["--corpus", corpus, "--out", out, *ARGS], str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["arms"]) == {"bpe", "superbpe"}
    held = [d for key, d in docs if is_held_out(key, 0.1)]
    assert held
    for arm, a in summary["arms"].items():
        run = json.load(open(os.path.join(out, arm, "bpb-s0.json")))
        assert run["steps"] == 4 and run["tokens_per_step"] == 2 * 32   # equal training compute per arm
        exported = json.load(open(os.path.join(run["export"], "config.json")))
        assert exported["num_hidden_layers"] == 1                         # --override reached the model
        assert a["documents"] == len(held) and a["lossless_documents"] == len(held)   # byte-level: lossless
        assert 0 < a["mean"] < 16 and a["bits_per_byte"] == [run["bits_per_byte"]]
        # the table's figure is what `mmfm eval bpb` gives on the arm's export and the corpus
        from mmfm.cli import main

        js = tmp_path / f"{arm}.json"
        assert main(["eval", "bpb", "--model", run["export"], "--corpus", corpus, "--window", "32",
                     "--json", str(js)]) == 0
        assert json.load(open(js))["bits_per_byte"] == pytest.approx(run["bits_per_byte"], rel=1e-6)
    # the arms differ only in the transition: plain BPE has no token across a space between words,
    # SuperBPE has some, and on these repeated phrases they buy fewer held-out tokens per byte
    assert summary["arms"]["superbpe"]["tokens_per_byte"] < summary["arms"]["bpe"]["tokens_per_byte"]

    # a rerun finds every stage's output and redoes nothing
    stamp = {arm: os.path.getmtime(os.path.join(out, arm, "bpb-s0.json")) for arm in ("bpe", "superbpe")}
    r = _run(["--corpus", corpus, "--out", out, *ARGS], str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretraining" not in r.stderr
    assert stamp == {arm: os.path.getmtime(os.path.join(out, arm, "bpb-s0.json")) for arm in ("bpe", "superbpe")}


def test_superbpe_bpb_names_a_bad_corpus_and_arm(tmp_path):
    r = _run(["--corpus", str(tmp_path), "--out", str(tmp_path / "o")], str(tmp_path))
    assert r.returncode == 2 and "--corpus" in r.stderr and "text-*.tar" in r.stderr
    os.makedirs(tmp_path / "c")
    open(tmp_path / "c" / "text-000000.tar", "wb").close()
    r = _run(["--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--arms", "bpe,wordpiece"], str(tmp_path))
    assert r.returncode == 2 and "--arms" in r.stderr and "wordpiece" in r.stderr
