"""`mmfm bench generate` end to end at toy size: every impl runs in both modes, and in greedy mode
every impl (HF's generate with its dynamic and its static cache, Token Recycling) emits exactly
the plain decode loop's tokens - the impls compute the same thing, so the timings compare equal work."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_generate_quick_writes_records_and_impls_agree(tmp_path):
    js = tmp_path / "gen.json"
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "generate", "--quick", "--new", "8",
                        "--prompt-len", "8", "--json", str(js)], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr[-3000:]
    records = json.loads(js.read_text())
    impls = {"mmfm", "hf_generate", "hf_static", "mmfm_token_recycling"}
    assert {(r["impl"], r["case"]["mode"]) for r in records} == {(i, m) for i in impls for m in ("greedy", "sample")}
    for r in records:
        assert r["bench"] == "generate" and r["case"]["B"] == 1 and r["case"]["new"] == 8
        assert r["tokens_per_s"] > 0 and r["cpu_ms"] > 0
        if r["case"]["mode"] == "greedy":
            assert r["same_as_mmfm"] is True, r["impl"]
    assert "hf_static's speed" in p.stdout
