"""The memory and speed switches through `mmfm pretrain`'s loop under DeepSpeed ZeRO-3 (one driver
process, tests/train_modes_run.py, 3 steps each on the tiny model with packed, document-masked
rows): ZeRO-3 parameter offload and full activation checkpointing give the plain ZeRO-3 run's
losses and gradient norms; bf16 autocast keeps DeepSpeed's bf16 off and the weights fp32, and its
losses follow fp32's to bf16 precision; every log row carries the peak memory."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)
SWITCHES = {"plain": [], "offload_params": ["train.offload_params=true"],
            "checkpointing": ["train.activation_checkpointing=full"], "autocast": ["train.precision=bf16_autocast"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("switches")
    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=60)
    common = [f"model={REPO}/configs/models/tiny.yaml", f"deepspeed={REPO}/configs/deepspeed/zero3.json",
              f"data.shards={d}/shards", "data.eval_shards=''", f"data.vocab={d}/vocab.json", "data.mix={}",
              "data.caption_dropout=0.0", "data.seq_len=64", "data.shuffle_buffer=8", "optim.lr=0.01",
              "optim.warmup_steps=1", "train.steps=3", "train.micro_batch=4", "train.log_every=1",
              "train.checkpoint_every=0", "train.progress=false", "train.plot=false", "train.peak_flops=1000000000.0"]
    spec = [{"name": name, "config": f"{REPO}/configs/pretrain/demo.yaml",
             "overrides": common + extra + [f"train.out={d}/{name}"]} for name, extra in SWITCHES.items()]
    (d / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "tests/train_modes_run.py", str(d / "spec.json"), str(d / "out.json")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((d / "out.json").read_text())


def _series(run, key):
    return [r[key] for r in run["rows"] if "loss" in r]


@pytest.mark.parametrize("name", ["offload_params", "checkpointing"])
def test_zero3_switch_gives_the_plain_losses_and_gradients(runs, name):
    plain, run = runs["plain"], runs[name]
    assert run["zero_stage"] == 3 and run["offload_param"] == (name == "offload_params")
    assert len(_series(run, "loss")) == 3
    for key in ("loss", "grad_norm"):
        for a, b in zip(_series(run, key), _series(plain, key)):
            assert abs(a - b) <= 1e-5 * abs(b), (name, key, _series(run, key), _series(plain, key))


def test_bf16_autocast_keeps_fp32_master_weights(runs):
    plain, run = runs["autocast"], runs["plain"]
    assert runs["autocast"]["bf16"] is False and runs["autocast"]["param_dtype"] == "torch.float32"
    for a, b in zip(_series(runs["autocast"], "loss"), _series(plain, "loss")):
        assert abs(a - b) < 0.02 * b
    assert _series(runs["autocast"], "loss") != _series(run, "loss")     # the forward did run in bf16


def test_every_log_row_has_the_peak_memory(runs):
    for run in runs.values():
        rows = [r for r in run["rows"] if "loss" in r]
        assert all(r["peak_memory_kind"] == "cpu_peak_rss" and 50 < r["peak_memory_mb"] < 64_000 for r in rows)
        assert all(b["peak_memory_mb"] >= a["peak_memory_mb"] for a, b in zip(rows, rows[1:]))   # a peak never falls
