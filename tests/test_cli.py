"""The `mmfm` command: doctor, demo and bench, run as a user would (subprocess where the exit
code and stdout matter)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmfm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mmfm(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmfm.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def test_doctor_lists_compiled_quant_ops():
    out = run_mmfm("doctor")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip() and " " in line.strip())
    assert lines["torch"].startswith(torch.__version__)
    assert "loaded" in out.stdout.split("mmfm._C", 1)[1].splitlines()[0]
    ops_line = next(line for line in out.stdout.splitlines() if line.startswith("compiled ops"))
    for op in ("nearest_code", "code_stats", "ema_codebook_update", "fsq_quantize", "lfq_quantize", "lfq_entropy",
               "residual_vq"):
        assert op in ops_line
    for key in ("python", "deepspeed", "webdataset", "sentencepiece", "flash-attn", "openmp threads", "nvcc"):
        assert any(line.startswith(key) for line in out.stdout.splitlines()), key
    assert out.stdout.strip().splitlines()[-1].split() == ["status", "ok"]


def test_doctor_without_extension_still_ok_and_says_why():
    out = run_mmfm("doctor", env={"MMFM_DISABLE_EXTENSION": "1"})
    assert out.returncode == 0, out.stderr
    assert "NOT loaded: disabled by MMFM_DISABLE_EXTENSION=1" in out.stdout


def test_doctor_fails_on_broken_install(tmp_path):
    # A package that raises on import stands in for a broken required dependency.
    (tmp_path / "webdataset").mkdir()
    (tmp_path / "webdataset" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    out = run_mmfm("doctor", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 1
    assert "webdataset" in out.stderr and "broken on purpose" in out.stderr


def test_bench_quant_quick_writes_records(tmp_path):
    path = tmp_path / "quant.json"
    out = run_mmfm("bench", "quant", "--quick", "--json", str(path))
    assert out.returncode == 0, out.stderr
    records = json.loads(path.read_text())
    impls = {r["impl"] for r in records}
    assert {"mmfm", "torch_cdist", "reference"} <= impls
    for r in records:
        assert r["bench"] == "quant" and isinstance(r["case"], dict) and r["ms"] > 0
    assert "mmfm" in out.stdout and "torch_cdist" in out.stdout


def test_bench_unknown_name_is_a_clear_error():
    assert cli.main(["bench", "nope"]) == 2


def test_demo_quant_trains_and_writes_outputs(tmp_path):
    out = run_mmfm("demo", "quant", "--steps", "300", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["vq"], ["fsq"])}
    assert set(rows) == {"vq", "fsq"}
    vq_used, vq_size = int(rows["vq"][2]), int(rows["vq"][4])
    assert vq_size == 128 and vq_used >= 100  # EMA + revival keeps most of the codebook alive
    assert float(rows["fsq"][1]) < 0.06 and float(rows["vq"][1]) < 0.06  # pixels in [0, 1]; the mean image scores ~0.1
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {m["quantizer"] for m in metrics} == {"vq", "fsq"}
    vq_mse = [m["mse"] for m in metrics if m["quantizer"] == "vq"]
    assert vq_mse[-1] < vq_mse[0]
    from PIL import Image

    img = Image.open(tmp_path / "reconstructions.png")
    assert img.size == (16 * 36, 3 * 36)
    from mmfm.quantizers import FSQ, VectorQuantizer

    vq = VectorQuantizer.load_safetensors(tmp_path / "vq_quantizer.safetensors")
    assert vq.codebook_size == 128
    assert FSQ.load_safetensors(tmp_path / "fsq_quantizer.safetensors").codebook_size == 1000
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("argv", [["demo", "nope"]])
def test_unknown_demo(argv):
    assert cli.main(argv) == 2
