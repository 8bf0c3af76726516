"""mmfm bench train --quick: records for mmfm and hf_llama in the docs/records.md format."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_quick_writes_records(tmp_path):
    js = tmp_path / "train.json"
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "train", "--quick", "--configs", "tiny",
                        "--steps", "2", "--json", str(js)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "hf_llama" in p.stdout and "tokens_per_s" in p.stdout
    records = json.loads(js.read_text())
    assert {r["impl"] for r in records} == {"mmfm", "hf_llama"}
    for r in records:
        assert r["bench"] == "train" and r["case"]["config"] == "tiny" and r["tokens_per_s"] > 0
        for k in ("data_ms", "forward_ms", "backward_ms", "optimizer_ms", "step_ms"):
            assert r[k] >= 0
