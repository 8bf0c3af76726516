"""mmfm bench train --quick: records for mmfm and every HF setting in the docs/records.md format,
trained in lockstep (same first loss), and a run whose sides diverge fails."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_quick_writes_records(tmp_path):
    js = tmp_path / "train.json"
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "train", "--quick", "--configs", "tiny",
                        "--steps", "2", "--json", str(js)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "hf_llama" in p.stdout and "tokens_per_s" in p.stdout and "the fastest HF setting" in p.stdout
    records = json.loads(js.read_text())
    assert {r["impl"] for r in records} == {"mmfm", "hf_llama", "hf_llama_labels", "hf_llama_chunked"}
    first = [r["first_loss"] for r in records]
    assert max(first) - min(first) <= 1e-4 * abs(first[0])   # the same step on the same weights and batch
    for r in records:
        assert r["bench"] == "train" and r["case"]["config"] == "tiny" and r["tokens_per_s"] > 0
        for k in ("data_ms", "forward_ms", "backward_ms", "optimizer_ms", "step_ms"):
            assert r[k] >= 0


def test_lockstep_check_rejects_a_side_that_trains_something_else():
    from mmfm.bench.train import Runner, check_lockstep

    a, b = object.__new__(Runner), object.__new__(Runner)
    a.name, b.name = "mmfm", "hf_llama"
    a.losses, b.losses = [8.30, 8.20], [8.30, 8.20]
    check_lockstep([a, b], "t")
    b.losses = [8.31, 8.20]                     # a different first step
    with pytest.raises(AssertionError, match="first loss of hf_llama"):
        check_lockstep([a, b], "t")
