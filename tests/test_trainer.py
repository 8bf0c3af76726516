"""The Trainer's extension points and its signal handling, through pretraining's user of it
(mmfm/train/loop.py run): an extra evaluator runs at the start, every train.eval_every steps and at
the end, its metrics in metrics.jsonl; a data source passed in is read and checkpointed; SIGTERM
(sent by a hook) saves the step and stops, and the resumed run ends with the uninterrupted run's
losses. One child process (a one-rank gloo group must not live in the pytest process)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)

CHILD = r"""
import json, os, signal, sys
import torch
from mmfm.data.dataset import ShardLoader
from mmfm.train.config import load_run_config
from mmfm.train.loop import run
from mmfm.train.tokens import token_dataset
from mmfm.train.trainer import Hooks
from mmfm.vocab import Vocab

torch.set_num_threads(1)
config, d = sys.argv[1], sys.argv[2]
pad = Vocab.load(d + "/vocab.json").pad_id
calls = {"probe": [], "data": []}

def probe(engine, step):          # an extra evaluator: sees the engine, returns metrics to log
    calls["probe"].append(step)
    return {"probe_step": float(step), "probe_params": float(sum(p.numel() for p in engine.module.parameters()))}

def data(global_batch):           # a data source passed in (here the same shards, counted)
    calls["data"].append(global_batch)
    return ShardLoader(token_dataset(d + "/shards", seq_len=64, batch_size=global_batch, pad_id=pad, seed=0,
                                     shuffle_buffer=32), num_workers=0)

class Term(Hooks):
    def on_step_end(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

out = {}
for name, hooks in (("ref", None), ("term", Term()), ("resumed", None)):
    cfg = load_run_config(config, [f"train.out={d}/{'term' if name == 'resumed' else name}", "train.steps=5",
                                   "train.eval_every=2", "train.checkpoint_every=0"])
    res = run(cfg, hooks=hooks, evaluators=[probe], data=data)
    out[name] = {"losses": res["losses"], "stopped_by": res["stopped_by"], "step": res["step"],
                 "eval_start": res["eval_start"], "eval_end": res["eval_end"], "probe": list(calls["probe"]),
                 "data": list(calls["data"])}
    calls = {"probe": [], "data": []}
json.dump(out, open(d + "/out.json", "w"))
"""


def test_evaluators_data_source_and_sigterm(tmp_path):
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    v = Vocab(64, {"image": 32})
    v.save(tmp_path / "vocab.json")
    synthetic_token_corpus(str(tmp_path / "shards"), v, n=120)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""model: {REPO}/configs/models/tiny.yaml
deepspeed: {REPO}/configs/deepspeed/zero0.json
data: {{shards: /nonexistent, vocab: {tmp_path}/vocab.json, seq_len: 64}}
optim: {{lr: 0.003, warmup_steps: 1}}
train: {{micro_batch: 2, log_every: 1, progress: false, plot: false}}
""")
    p = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    ref, term, resumed = out["ref"], out["term"], out["resumed"]
    # the evaluator: start (0), every 2 steps before the end (2, 4), end (5); logged with its step
    assert ref["probe"] == [0, 2, 4, 5] and ref["data"] == [2]
    assert ref["eval_start"]["probe_step"] == 0.0 and ref["eval_end"]["probe_step"] == 5.0
    rows = [json.loads(line) for line in open(tmp_path / "ref" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "probe_step" in r] == [0, 2, 4, 5]
    # SIGTERM after step 3: the step is saved, the run stops without the end evaluation
    assert term["stopped_by"] == "SIGTERM" and term["step"] == 3 and term["eval_end"] is None
    assert "SIGTERM: saving a checkpoint at step 3" in p.stderr
    assert "resumed from step 3" in p.stderr and "step_00000003" in p.stderr
    # resumed from step 3 (the data source's position restored): the uninterrupted run's losses
    assert sorted(resumed["losses"]) == ["4", "5"]
    for s in ("4", "5"):
        assert resumed["losses"][s] == ref["losses"][s], (s, resumed["losses"], ref["losses"])
    for s in ("1", "2", "3"):
        assert term["losses"][s] == ref["losses"][s]
