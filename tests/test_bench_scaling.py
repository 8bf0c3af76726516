"""`mmfm bench train --scaling` (mmfm/bench/scaling.py) at tiny sizes, and the CPU-reachable parts of
tools/gpu_check.sh's training stage: its arguments parse, its model configs build, and its entry
(`--trainer-run`: the Trainer, DeepSpeed, packing, tokens/s, MFU, peak memory) runs on the CPU
with the tiny config. The ranks part (two torchrun launches) is left to the benchmark itself."""
import json
import os
import re
import shlex
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


def _stage_args() -> list[str]:
    text = open(os.path.join(REPO, "tools/gpu_check.sh")).read()
    m = re.search(r"TRAIN_ARGS=\((.*?)\)\n", text, re.S)
    assert m, "tools/gpu_check.sh: no TRAIN_ARGS=(...) in the training stage"
    args = shlex.split(m.group(1).replace("\\\n", " "))
    return [re.sub(r"\$\{GPU_CHECK_TRAIN_CONFIG:-(\w+)\}", r"\1", a) for a in args]


def test_gpu_check_training_stage_parses_and_its_models_build():
    from mmfm.bench.scaling import _model_cfg, build_parser
    from mmfm.models import Transformer

    assert subprocess.run(["bash", "-n", os.path.join(REPO, "tools/gpu_check.sh")]).returncode == 0
    a = build_parser().parse_args(_stage_args())
    assert a.trainer_run and a.device == "cuda" and a.precision == "bf16" and a.config == "llama_1b"
    assert a.steps == 50 and a.seq == 2048
    sizes = {}
    for name, vocab in ((a.config, a.vocab), ("m100", 4096)):
        cfg = _model_cfg(name, vocab, a.seq)
        with torch.device("meta"):           # the 1.1B model's shape without its 4.4 GB
            sizes[name] = sum(p.numel() for p in Transformer(cfg).parameters())
        assert cfg.flops_per_token(a.seq) > 6 * (sizes[name] - vocab * cfg.dim)
    assert 1.0e9 < sizes["llama_1b"] < 1.3e9 and 95e6 < sizes["m100"] < 105e6, sizes


def test_trainer_run_on_cpu_reports_tokens_mfu_and_peak_memory(tmp_path):
    out = tmp_path / "rec.json"
    p = subprocess.run([sys.executable, "-m", "mmfm.bench.scaling", "--trainer-run", "--device", "cpu",
                        "--config", "tiny", "--seq", "64", "--batch", "2", "--steps", "4", "--samples", "200",
                        "--vocab", "256", "--peak-n", "256", "--out", str(tmp_path / "run"), "--json", str(out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["bench"] == "train_scaling" and r["case"]["part"] == "trainer" and r["case"]["ranks"] == 1
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0.05
    assert r["loss_first"] > 0 and torch.isfinite(torch.tensor(r["loss_last"]))
    assert not os.path.exists(tmp_path / "run/checkpoints")      # no checkpoint write in a timing run


def test_scaling_pack_and_mfu_parts(tmp_path):
    from mmfm.bench.scaling import main

    out = tmp_path / "rec.json"
    assert main(["--quick", "--parts", "pack,mfu", "--json", str(out)]) == 0
    recs = {(r["case"]["part"], r["impl"]): r for r in json.loads(out.read_text())}
    packed, padded = recs[("pack", "packed")], recs[("pack", "padded")]
    # concat packing fills every row; one sample per row leaves most of a 64-token row as padding
    assert packed["fill"] == 1.0 and padded["fill"] < 0.8
    assert packed["real_tokens_per_s"] > 0 and padded["real_tokens_per_s"] > 0
    mfu = recs[("mfu", "fp32")]
    assert 0 < mfu["mfu"] < 1 and mfu["peak_gflops"] > 0 and mfu["case"]["config"] == "tiny"


def test_scaling_rejects_an_unknown_part(capsys):
    from mmfm.bench.scaling import main

    assert main(["--parts", "ranks,speed"]) == 2
    assert "--parts: unknown speed" in capsys.readouterr().err
