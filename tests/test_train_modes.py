"""The trainer beyond fp32 next-token runs: ZeRO-2 with the optimizer offloaded (DeepSpeedCPUAdam,
configs/deepspeed/zero2_offload.json) in bf16, with a SIGKILL and resume; the masked (4M) and
hybrid (BAMM) objectives; the Mixture-of-Transformers model, through `mmfm pretrain`'s loop.
One driver process runs the short runs (tests/train_modes_run.py). The first run JIT-compiles
DeepSpeed's cpu_adam into <repo>/.torch_extensions (about a minute, once per checkout)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("modes")
    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=200)
    synthetic_token_corpus(str(d / "eval"), v, n=16, seed=1, prefix="eval")
    common = [f"data.shards={d}/shards", f"data.eval_shards={d}/eval", f"data.vocab={d}/vocab.json",
              "data.seq_len=64", "data.shuffle_buffer=32", "data.eval_sequences=4", "optim.lr=0.01",
              "optim.warmup_steps=2", f"train.steps={STEPS}", "train.micro_batch=4", "train.log_every=1",
              "train.progress=false", "train.plot=false"]
    tiny, tiny_mot = f"model={REPO}/configs/models/tiny.yaml", f"model={REPO}/configs/models/tiny_mot.yaml"
    offload = common + [tiny, "train.checkpoint_every=2", "train.grad_accum=2"]
    # the offload + bf16 run killed after step 5 (newest checkpoint: step 4); resumed by the driver
    killed = [sys.executable, "tests/train_fault_run.py", "--kill-at", "5", "--", "pretrain", "--config",
              f"{REPO}/configs/pretrain/offload_bf16.yaml", *offload, f"train.out={d}/offload_killed"]
    p = subprocess.run(killed, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == -9, p.stderr[-3000:]
    spec = [
        {"name": "offload_bf16", "config": f"{REPO}/configs/pretrain/offload_bf16.yaml",
         "overrides": offload + [f"train.out={d}/offload"]},
        {"name": "offload_bf16_resumed", "config": f"{REPO}/configs/pretrain/offload_bf16.yaml",
         "overrides": offload + [f"train.out={d}/offload_killed"]},
        {"name": "masked", "config": f"{REPO}/configs/pretrain/masked.yaml",
         # masked prediction on this toy data learns slowly: more steps, a larger batch, a lower lr
         "overrides": common + [tiny, f"train.out={d}/masked", "train.checkpoint_every=0", "train.steps=20",
                                "train.micro_batch=8", "optim.lr=0.003"]},
        {"name": "hybrid_mot", "config": f"{REPO}/configs/pretrain/hybrid.yaml",
         "overrides": common + [tiny_mot, f"train.out={d}/hybrid", "train.checkpoint_every=0"]},
        {"name": "mot", "config": f"{REPO}/configs/pretrain/mot.yaml",
         "overrides": common + [tiny_mot, f"train.out={d}/mot", "train.checkpoint_every=0"]},
    ]
    (d / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "tests/train_modes_run.py", str(d / "spec.json"), str(d / "out.json")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((d / "out.json").read_text())
    for r in res.values():
        r["losses"] = {int(k): v for k, v in r["losses"].items()}
    return res


def _falls(losses, k=2):
    """Mean of the last k training losses below the mean of the first k (single steps are noisy)."""
    steps = sorted(losses)
    return sum(losses[s] for s in steps[-k:]) < sum(losses[s] for s in steps[:k])


def test_offload_bf16_trains_and_resumes_exactly(runs):
    ref, resumed = runs["offload_bf16"], runs["offload_bf16_resumed"]
    assert ref["optimizer"] == "DeepSpeedCPUAdam" and ref["offload"] and ref["zero_stage"] == 2
    assert ref["bf16"] and ref["param_dtype"] == "torch.bfloat16"
    assert sorted(ref["losses"]) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in ref["losses"].values()) and _falls(ref["losses"]), ref["losses"]
    assert ref["eval_end"]["eval_loss"] < ref["eval_start"]["eval_loss"]
    # the trainer's steps and evaluations all went through the fused loss, never full logits:
    # 8 steps x 2 micro-batches + 2 evaluations x 1 held-out batch
    assert ref["head_calls"] == {"logits": 0, "fused_loss": STEPS * 2 + 2}, ref["head_calls"]
    # resumed from step 4 after the SIGKILL: steps 5..8 replay the uninterrupted run's losses
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    for s in (5, 6, 7, 8):
        assert resumed["losses"][s] == ref["losses"][s], (s, resumed["losses"], ref["losses"])


@pytest.mark.parametrize("name", ["masked", "hybrid_mot", "mot"])
def test_objectives_and_mot_lower_the_loss_and_report_per_modality(runs, name):
    r = runs[name]
    assert _falls(r["losses"], 4 if name == "masked" else 2), r["losses"]
    assert r["eval_end"]["eval_loss"] < r["eval_start"]["eval_loss"], (r["eval_start"], r["eval_end"])
    train_rows = [row for row in r["rows"] if "tokens_per_s" in row]
    for mod in ("image", "audio", "text"):
        assert all(math.isfinite(row[f"loss_{mod}"]) for row in train_rows if f"loss_{mod}" in row)
        assert any(f"loss_{mod}" in row for row in train_rows), (name, mod)
        assert f"eval_loss_{mod}" in r["eval_end"]
    if name != "masked":      # Mixture-of-Transformers: one weight copy per modality group (specials + 3)
        assert r["params"] > 3 * runs["masked"]["params"] // 2
