"""train.compile through the real Trainer and DeepSpeed engine (`mmfm pretrain`'s loop, ZeRO-2, one
driver process: tests/train_modes_run.py), for the dense decoder and Mixture-of-Transformers
(modality_sparse): 3 steps on the tiny model with packed, document-masked rows, compiled with
aot_eager (Dynamo + AOTAutograd, as inductor traces, without its C++ code generation, which costs
minutes on this CPU), against the same runs eager. The losses and gradient norms agree to 1e-5
relative; the dense model compiles to one graph with no break; Mixture-of-Transformers breaks only
in its token routing (make_plan: per-modality row counts are data), never in the loss head."""
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

RUNS = {"dense": [], "dense_compiled": ["train.compile=true", "train.compile_backend=aot_eager"],
        "mot": ["model.modality_sparse=true"],
        "mot_compiled": ["model.modality_sparse=true", "train.compile=true", "train.compile_backend=aot_eager"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("compile_ds")
    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=40)
    common = [f"model={REPO}/configs/models/tiny.yaml", f"deepspeed={REPO}/configs/deepspeed/zero2.json",
              f"data.shards={d}/shards", "data.eval_shards=''", f"data.vocab={d}/vocab.json", "data.mix={}",
              "data.caption_dropout=0.0", "data.seq_len=64", "data.shuffle_buffer=8", "optim.lr=0.01",
              "optim.warmup_steps=1", "train.steps=3", "train.micro_batch=4", "train.log_every=1",
              "train.checkpoint_every=0", "train.progress=false", "train.plot=false", "train.peak_flops=1000000000.0"]
    spec = [{"name": name, "config": f"{REPO}/configs/pretrain/demo.yaml",
             "overrides": common + extra + [f"train.out={d}/{name}"]} for name, extra in RUNS.items()]
    (d / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "tests/train_modes_run.py", str(d / "spec.json"), str(d / "out.json")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((d / "out.json").read_text())


def _series(run, key):
    return [r[key] for r in run["rows"] if "loss" in r]


@pytest.mark.parametrize("arch", ["dense", "mot"])
def test_compiled_training_in_the_deepspeed_engine_follows_eager(runs, arch):
    eager, compiled = runs[arch], runs[f"{arch}_compiled"]
    assert compiled["compiled"] and not eager["compiled"] and compiled["zero_stage"] == 2
    assert compiled["params"] == eager["params"]
    assert (runs["mot"]["params"] > runs["dense"]["params"]) if arch == "mot" else True   # MoT: weights per modality
    assert eager["head_calls"]["logits"] == 0 < eager["head_calls"]["fused_loss"]   # (compiled runs are not counted)
    assert len(_series(compiled, "loss")) == 3
    for key in ("loss", "grad_norm"):
        for a, b in zip(_series(compiled, key), _series(eager, key)):
            assert abs(a - b) <= 1e-5 * abs(b), (arch, key, _series(compiled, key), _series(eager, key))
    if arch == "dense":
        assert compiled["graphs"] == 1 and compiled["graph_breaks"] == [], compiled["graph_breaks"]
    else:
        assert compiled["graphs"] >= 1 and not any("loss" in b for b in compiled["graph_breaks"])
