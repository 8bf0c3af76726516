"""DeepSpeed training on CPU: ZeRO 1/2/3 with 2 ranks against 1 rank, exact resume after SIGKILL,
an interrupted checkpoint write, NaN steps, bad configs. Sized for 2 cores: a tiny model, 5-6 steps.
The first run JIT-compiles DeepSpeed's shm_comm op into <repo>/.torch_extensions (once)."""
import json
import os
import subprocess
import sys

import pytest

from mmfm.tokenizers.config import ConfigError
from mmfm.train.config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("tok")
    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=200)
    cfg = d / "run.yaml"
    cfg.write_text(f"""model: {REPO}/configs/models/tiny.yaml
deepspeed: {REPO}/configs/deepspeed/zero0.json
data: {{shards: {d}/shards, vocab: {d}/vocab.json, seq_len: 64, shuffle_buffer: 32}}
optim: {{lr: 0.003, warmup_steps: 2}}
train: {{out: {d}/out, steps: 5, micro_batch: 2, grad_accum: 2, log_every: 1, checkpoint_every: 2, progress: false}}
""")
    return d, cfg


def _run(args, timeout=300, env=None, check=True):
    p = subprocess.run(args, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def _faulty(faults: list[str], args: list[str]) -> list[str]:
    """`mmfm <args>` run through tests/train_fault_run.py with fault-injection hooks."""
    return [sys.executable, "tests/train_fault_run.py", *faults, "--", *args]


def _losses(path):
    return {int(k): v for k, v in json.load(open(path)).items()}


def test_zero_1_2_3_two_ranks_match_one_rank(corpus):
    d, cfg = corpus
    # 1 rank: micro 2 x accum 2 = global 4; 2 ranks: micro 2 x accum 1 x 2 ranks = global 4
    _run([sys.executable, "tests/train_run.py", str(cfg), str(d / "one.json"), "0"])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
          "tests/train_run.py", str(cfg), str(d / "two.json"), "1,2,3", "train.grad_accum=1"], timeout=600)
    one = {int(k): v for k, v in json.load(open(d / "one.json"))["0"].items()}
    two = json.load(open(d / "two.json"))
    assert sorted(one) == [1, 2, 3, 4, 5] and one[5] < one[1]
    for stage in ("1", "2", "3"):
        losses = {int(k): v for k, v in two[stage].items()}
        assert losses[5] < losses[1], (stage, losses)
        for s in range(1, 6):
            assert abs(losses[s] - one[s]) <= 1e-4 * abs(one[s]), (stage, s, losses[s], one[s])
    # export: ZeRO-3 shards (2 ranks) and stage 0 -> safetensors folder; mmfm.load == engine == transformers
    import torch
    from transformers import LlamaForCausalLM

    import mmfm

    ids = torch.arange(48).reshape(2, 24) % 133
    for run in ("two.json.run_zero3", "one.json.run_zero0"):
        _run([sys.executable, "-m", "mmfm.cli", "export", str(d / run), "--out", str(d / f"{run}.export"),
              "--shard-mb", "0.2"])
        assert os.path.exists(d / f"{run}.export/model.safetensors.index.json")     # sharded above 0.2 MB
        engine_logits = torch.load(d / f"{run}.logits.pt")
        with torch.no_grad():
            ours = mmfm.load(str(d / f"{run}.export"))(ids)
            hf = LlamaForCausalLM.from_pretrained(str(d / f"{run}.export")).eval()(ids).logits
        assert torch.allclose(ours, engine_logits, atol=1e-5, rtol=0)
        assert torch.allclose(hf, ours, atol=1e-4, rtol=0)


def _metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r]


def test_sigkill_resume_and_interrupted_save_give_identical_losses(corpus):
    d, cfg = corpus
    args = ["pretrain", "--config", str(cfg), "train.steps=6"]
    base = [sys.executable, "-m", "mmfm.cli", *args]
    _run(base + [f"train.out={d}/ref"])
    ref = {r["step"]: r["loss"] for r in _metrics(d / "ref")}
    # SIGKILL after step 5 (last checkpoint: step 4), then resume
    p = _run(_faulty(["--kill-at", "5"], args + [f"train.out={d}/killed"]), check=False)
    assert p.returncode == -9
    assert open(d / "killed/checkpoints/latest").read() == "step_00000004"
    _run(base + [f"train.out={d}/killed"])
    rows = _metrics(d / "killed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6]
    assert {r["step"]: r["loss"] for r in rows} == ref          # exact: resumed losses equal uninterrupted
    # killed while writing the step-4 checkpoint: step 2 stays the latest and loads
    p = _run(_faulty(["--kill-in-save", "4"], args + [f"train.out={d}/torn"]), check=False)
    assert p.returncode == -9
    assert open(d / "torn/checkpoints/latest").read() == "step_00000002"
    p = _run(base + [f"train.out={d}/torn"])
    assert "resumed from" in p.stderr and "step_00000002" in p.stderr
    rows = _metrics(d / "torn")
    assert {r["step"]: r["loss"] for r in rows} == ref
    assert os.path.exists(d / "ref/loss_curve.png") and os.path.isdir(d / "ref/tb")
    r = _metrics(d / "ref")[-1]
    for k in ("lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_frac", "loss_text", "loss_image"):
        assert k in r, k
    kept = sorted(t for t in os.listdir(d / "ref/checkpoints") if t.startswith("step_"))
    assert kept == ["step_00000004", "step_00000006"]           # keep_last = 2


def test_nan_steps_are_skipped_then_the_run_stops(corpus):
    d, cfg = corpus
    args = ["pretrain", "--config", str(cfg), "train.checkpoint_every=0", "train.max_bad_steps=2"]
    _run(_faulty(["--nan-steps", "3"], args + [f"train.out={d}/nan1"]))
    rows = _metrics(d / "nan1")
    assert rows[2]["skipped_steps"] == 1 and rows[2]["lr"] == 0.0 and rows[-1]["skipped_steps"] == 1
    p = _run(_faulty(["--nan-steps", "2,3"], args + [f"train.out={d}/nan2"]), check=False)
    assert p.returncode == 3 and "consecutive steps had a non-finite loss" in p.stderr


def test_bad_configs_name_the_field(corpus, tmp_path):
    d, cfg = corpus
    with pytest.raises(ConfigError, match=r"run.yaml: train.stepz: unknown field"):
        load_run_config(cfg, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train.precision"):
        load_run_config(cfg, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected a number"):
        load_run_config(cfg, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"data.seq_len: exceeds"):
        load_run_config(cfg, ["data.seq_len=100000"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(cfg).read() + "trian: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: trian: unknown top-level field"):
        load_run_config(bad)
    p = _run([sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(cfg), "model.n_heads=5"], check=False)
    assert p.returncode == 2 and "model.n_heads" in p.stderr
