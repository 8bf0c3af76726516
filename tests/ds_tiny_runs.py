"""Shared by the tests that compare short `mmfm pretrain` runs of the tiny model under DeepSpeed
(test_train_switches_ds.py, test_compile_ds.py): one synthetic token corpus, one list of common
overrides, every run in one driver process (tests/train_modes_run.py, one DeepSpeed/gloo start-up)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


def tiny_runs(d, runs: dict, deepspeed: str, samples: int, timeout: int) -> dict:
    """{name: the driver's record} for each run name -> its extra overrides, 3 steps each on the tiny
    model with packed, document-masked rows, under configs/deepspeed/<deepspeed>."""
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=samples)
    common = [f"model={REPO}/configs/models/tiny.yaml", f"deepspeed={REPO}/configs/deepspeed/{deepspeed}",
              f"data.shards={d}/shards", "data.eval_shards=''", f"data.vocab={d}/vocab.json", "data.mix={}",
              "data.caption_dropout=0.0", "data.seq_len=64", "data.shuffle_buffer=8", "optim.lr=0.01",
              "optim.warmup_steps=1", "train.steps=3", "train.micro_batch=4", "train.log_every=1",
              "train.checkpoint_every=0", "train.progress=false", "train.plot=false", "train.peak_flops=1000000000.0"]
    spec = [{"name": name, "config": f"{REPO}/configs/pretrain/demo.yaml",
             "overrides": common + extra + [f"train.out={d}/{name}"]} for name, extra in runs.items()]
    (d / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "tests/train_modes_run.py", str(d / "spec.json"), str(d / "out.json")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((d / "out.json").read_text())


def series(run: dict, key: str) -> list:
    return [r[key] for r in run["rows"] if "loss" in r]
