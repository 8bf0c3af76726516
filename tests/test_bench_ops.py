"""The op benchmarks (mmfm bench cache / sampling / quant / linear / attention) and their shared checks
(mmfm/bench/common.py): each quick run's impls computed the same thing, the agreement checks
reject an impl that computes something else, and a benchmark refuses to time the pure-torch
reference under the mmfm name (extension disabled with MMFM_DISABLE_EXTENSION=1, the switch
mmfm/_ext.py reads; --device cuda on a CPU build) or a --device it cannot honour."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmfm.bench import attention as bench_attention
from mmfm.bench import cache as bench_cache
from mmfm.bench import linear as bench_linear
from mmfm.bench import quant as bench_quant
from mmfm.bench import sampling as bench_sampling
from mmfm.bench.common import CompiledOpNotRun, check_agree, peak_extra_mb, require_compiled
from mmfm.ops import cache as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _compiled(needs_extension):
    """The benchmarks time the compiled ops; the fallback is tested in subprocesses below."""


def run_mmfm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmfm.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=300)


# --------------------------------------------------------------------------- quick runs agree
def test_bench_cache_quick_impls_agree_and_headlines_only_loop_ops(tmp_path, capsys):
    path = tmp_path / "cache.json"
    assert bench_cache.main(["--quick", "--json", str(path)]) == 0   # raises if an impl disagreed
    out = capsys.readouterr().out
    records = json.loads(path.read_text())
    impls = {op: {r["impl"] for r in records if r["case"]["op"] == op} for op in
             ("decode_append", "prefill_append", "insert", "gather_beams")}
    assert impls["insert"] == {"mmfm", "mmfm_op", "torch_loop", "reference"}   # no full-capacity torch.cat
    assert {"torch", "torch_loop"} <= impls["prefill_append"] and {"torch", "torch_loop"} <= impls["decode_append"]
    assert all(r["ms"] > 0 and r["cpu_ms"] >= 0 for r in records)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("op=")
             and ("x the fastest" in line or "no headline" in line)}
    assert "called by the decode loop" in lines["op=prefill_append"]
    assert "no headline" in lines["op=insert"] and "no headline" in lines["op=gather_beams"]


def test_cache_check_rejects_an_impl_that_writes_the_wrong_slot():
    cache = torch.randn(2, 2, 16, 4)
    new = torch.randn(2, 2, 1, 4)
    starts = torch.tensor([3, 7])
    impls = {"reference": lambda: C.kv_append_reference(cache, new, starts),
             "mmfm": lambda: C.kv_append(cache, new, starts),
             "torch_loop": lambda: cache[:, :, 4].copy_(new[:, :, 0])}   # slot 4 for every row: wrong
    with pytest.raises(AssertionError, match="impl torch_loop disagrees"):
        bench_cache.check_impls("decode", impls, cache)
    bench_cache.check_impls("decode", {k: impls[k] for k in ("reference", "mmfm")}, cache)


def test_bench_sampling_quick_impls_in_support(tmp_path, capsys):
    path = tmp_path / "sampling.json"
    assert bench_sampling.main(["--quick", "--mode", "topk_topp", "min_p", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    impls = {r["impl"] for r in records if r["case"]["mode"] == "topk_topp"}
    assert {"mmfm", "reference", "hf_warpers", "torch_topk", "floor_sum", "floor_copy"} <= impls
    assert "torch_min_p" in {r["impl"] for r in records if r["case"]["mode"] == "min_p"}
    assert all(r["cpu_ms"] >= 0 and r["peak_extra_mb"] >= 0 for r in records)
    assert "the floor (floor_" in capsys.readouterr().out


def test_torch_topk_topp_keeps_exactly_mmfms_set():
    """The careful-user baseline draws from the same kept set as mmfm (top-p within the k survivors)."""
    logits = 2.0 * torch.randn(4, 3000, generator=torch.Generator().manual_seed(5))
    params = bench_sampling.MODES["topk_topp"]
    from mmfm.ops import sampling

    kept = sampling.processed_probs(logits, **params) > 0
    seen = torch.zeros_like(kept)
    torch.manual_seed(0)
    for _ in range(400):
        tok = bench_sampling.torch_topk_topp(logits, **params)
        seen[torch.arange(4), tok] = True
    assert not bool((seen & ~kept).any())               # never outside the set
    assert int(seen.sum()) >= 0.9 * int(kept.sum())     # and reaches (almost) all of it


def test_sampling_check_rejects_an_impl_outside_the_support():
    logits = 2.0 * torch.randn(2, 500, generator=torch.Generator().manual_seed(1))
    impls = {"mmfm": lambda: torch.argmax(logits, -1), "bad": lambda: torch.argmin(logits, -1)}
    with pytest.raises(AssertionError, match="impl bad drew a token outside"):
        bench_sampling.check_support(impls, logits, bench_sampling.MODES["topk_topp"], "t")


def test_bench_quant_quick_picks_are_nearest(tmp_path):
    path = tmp_path / "quant.json"
    assert bench_quant.main(["--quick", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    nearest = [r for r in records if r["case"]["op"] == "nearest_code"]
    assert {"mmfm", "torch_cdist", "reference", "vector_quantize_pytorch"} <= {r["impl"] for r in nearest}
    for r in nearest:   # fp32 impls pick mmfm's code on these random inputs; bf16 ones may not
        assert r["same_index"] == 1.0 or r["case"]["dtype"] == "bfloat16", r
    cdist_f32 = next(r for r in nearest if r["impl"] == "torch_cdist" and r["case"]["K"] == 256
                     and r["case"]["dtype"] == "float32")
    mmfm_f32 = next(r for r in nearest if r["impl"] == "mmfm" and r["case"]["K"] == 256
                    and r["case"]["dtype"] == "float32")
    assert cdist_f32["peak_extra_mb"] >= 1024 * 256 * 4 / 2**20 > mmfm_f32["peak_extra_mb"]   # the N x K matrix
    assert {"fsq_quantize", "lfq_entropy_exact", "code_stats", "residual_vq"} <= {r["case"]["op"] for r in records}


def test_quant_check_rejects_a_far_code():
    g = torch.Generator().manual_seed(2)
    z, e = torch.randn(64, 8, generator=g), torch.randn(32, 8, generator=g)
    near = torch.cdist(z, e).argmin(1)
    far = torch.cdist(z, e).argmax(1)
    assert bench_quant.check_nearest(z, e, {"mmfm": near, "x": near}, "t")["x"] == 1.0
    with pytest.raises(AssertionError, match="impl x picked code"):
        bench_quant.check_nearest(z, e, {"mmfm": near, "x": far}, "t")


def test_check_agree_and_peak_memory_see_what_they_should():
    with pytest.raises(AssertionError, match="impl b disagrees"):
        check_agree({"a": torch.zeros(3), "b": torch.tensor([0.0, 0.0, 1e-3])}, "t")
    check_agree({"a": torch.zeros(3), "b": torch.tensor([0.0, 0.0, 1e-3])}, "t", atol=1e-2)
    # a transient 64 MiB buffer, freed before fn returns, still counts in full
    assert 63.9 < peak_extra_mb(lambda: torch.empty(16 * 2**20).fill_(1.0).sum()) < 70


def test_bench_linear_quick_impls_agree_and_name_the_kernel(tmp_path, capsys):
    path = tmp_path / "linear.json"
    assert bench_linear.main(["--quick", "--rows", "1", "5", "--json", str(path)]) == 0   # raises on disagreement
    captured = capsys.readouterr()
    records = json.loads(path.read_text())
    assert {r["impl"] for r in records} == {"torch_flinear", "torch_contig", "mmfm", "mmfm_generic"}
    assert sorted({r["case"]["rows"] for r in records}) == [1, 5]
    assert "kernel avx2-fma" in captured.err or "kernel generic" in captured.err
    assert "a tree pass's matmuls against one step's: 5 rows" in captured.out


def test_bench_attention_quick_impls_agree(tmp_path, capsys):
    path = tmp_path / "attention.json"
    assert bench_attention.main(["--quick", "--json", str(path)]) == 0    # raises on disagreement
    records = json.loads(path.read_text())
    assert {r["case"]["op"] for r in records} == {"step", "ragged_step", "tree"}
    assert {r["impl"] for r in records} == {"torch_sdpa", "mmfm", "mmfm_generic"}
    assert "x torch_sdpa" in capsys.readouterr().out


def test_linear_check_rejects_a_wrong_layout():
    """The agreement check the bench runs catches a weight used untransposed (the bug a layout
    change invites): [in, out] read as [out, in] on a square layer gives other numbers."""
    w = torch.randn(16, 16)
    x = torch.randn(3, 16)
    from mmfm.ops import linear as L
    good = L.decode_linear(x, L.pack_linear(w))
    bad = L.decode_linear(x, L.pack_linear(w.t()))
    check_agree({"a": x @ w, "mmfm": good}, "linear", atol=1e-4)
    with pytest.raises(AssertionError, match="impl mmfm disagrees"):
        check_agree({"a": x @ w, "mmfm": bad}, "linear", atol=1e-4)


# ------------------------------------------------------------- refusing to time the wrong thing
@pytest.mark.parametrize("name", ["cache", "sampling", "quant", "linear", "attention"])
def test_bench_refuses_without_the_extension(name):
    out = run_mmfm("bench", name, "--quick", env={"MMFM_DISABLE_EXTENSION": "1"})
    assert out.returncode == 2, out.stdout[-2000:]
    assert "mmfm._C is not loaded (disabled by MMFM_DISABLE_EXTENSION=1)" in out.stderr
    assert out.stdout == ""   # nothing was timed


def test_require_compiled_catches_a_wrapper_falling_back():
    """Past the start-up check, a run whose mmfm impl falls back to the reference still fails."""
    script = textwrap.dedent("""
        import torch
        from mmfm.bench.common import CompiledOpNotRun, require_compiled
        from mmfm.ops import cache as C
        cache, new, starts = torch.zeros(2, 1, 8, 4), torch.ones(2, 1, 1, 4), torch.tensor([1, 2])
        try:
            require_compiled(lambda: C.kv_append(cache, new, starts), "kv_append")
        except CompiledOpNotRun as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, MMFM_DISABLE_EXTENSION="1"))
    assert "refused: kv_append: the mmfm impl ran no torch.ops.mmfm op" in out.stdout, out.stderr[-2000:]
    # and with the extension loaded the same call passes and names the op it ran
    assert require_compiled(lambda: C.kv_append(torch.zeros(2, 1, 8, 4), torch.ones(2, 1, 1, 4),
                                                torch.tensor([1, 2])), "kv_append") == {"mmfm::kv_append"}
    with pytest.raises(CompiledOpNotRun):
        require_compiled(lambda: C.kv_append_reference(torch.zeros(2, 1, 8, 4), torch.ones(2, 1, 1, 4),
                                                       torch.tensor([1, 2])), "reference")


@pytest.mark.parametrize("name", ["cache", "sampling", "quant", "linear", "attention", "train", "data", "tokenize"])
def test_bench_device_is_honoured_or_refused(name, capsys):
    from mmfm.bench import run

    assert run(name, ["--device", "tpu"]) == 2        # not a device any bench knows
    assert "--device must be cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    if name in ("data", "tokenize", "linear", "attention"):   # CPU-only by nature: refused even with a GPU
        assert run(name, ["--device", "cuda"]) == 2
        assert "--device cuda is not supported" in capsys.readouterr().err
    elif not torch.cuda.is_available():
        assert run(name, ["--device", "cuda"]) == 2
        assert "--device cuda needs a visible GPU" in capsys.readouterr().err


def test_bench_refuses_cuda_on_a_cpu_build():
    """With a GPU but an extension built without CUDA kernels, --device cuda is refused (not timed
    on the references); the check itself runs here on any machine."""
    from mmfm import _ext
    from mmfm.bench.common import compiled_unavailable

    assert compiled_unavailable("cpu") is None
    why = compiled_unavailable("cuda")
    assert (why is None) == _ext.with_cuda()
    if why is not None:
        assert "--device cuda: mmfm._C was built without CUDA kernels" in why
