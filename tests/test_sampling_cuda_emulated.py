"""The CUDA sampling kernels' block logic, run on the CPU.

tests/cuda_emu builds csrc/sampling/*_kernel.cuh as plain C++ against a stand-in for the CUDA
runtime (each thread a fiber, barriers and warp shuffles as yields; 64 threads per block), so
the kernels' reductions, bisection, shared-memory sort, draws and barrier structure are checked
against the references on machines without a GPU. It says nothing about timing, memory
coalescing or real concurrency: tests/test_sampling_cuda.py does that on a GPU. Needs g++.
"""
import ctypes
import math

import pytest
import torch
from emu_build import CXX, build_emulator

from mmfm import _ext
from mmfm.ops import sampling as S

if CXX is None:
    pytest.skip("no C++ compiler (g++) to build the CUDA emulation", allow_module_level=True)

SOURCES = ["tests/cuda_emu/emu_sampling.cpp", "tests/cuda_emu/cuda_runtime.h", "csrc/sampling/sampling_cuda.cuh",
           "csrc/sampling/sample_cuda_kernel.cuh", "csrc/sampling/verify_cuda_kernel.cuh",
           "csrc/sampling/sampling_common.h", "csrc/sampling/sampling_kernels.h", "csrc/common/dtype.h"]
INF = math.inf
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


@pytest.fixture(scope="module")
def emu():
    lib = build_emulator(SOURCES, "mmfm_cuda_emu")
    lib.emu_sample.argtypes = [P, ctypes.c_int, I64, I64, P, P, P, P, I64, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.c_int, P, P, P, P]
    lib.emu_verify_chain.argtypes = [P, P, P, I64, I64, I64, ctypes.c_uint64, ctypes.c_uint64, P, P, P]
    lib.emu_verify_multi_draft.argtypes = [P, P, ctypes.c_int, P, I64, I64, I64, ctypes.c_int, ctypes.c_uint64,
                                           ctypes.c_uint64, P, P, P]
    return lib


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def emu_run(lib, logits, write_probs, seed=0, offset=0, allowed_range=None, allowed_mask=None, history=None,
            **params):
    B, V = logits.shape
    P_ = S.pack_params(B, V, "cpu", **params).contiguous()
    rng = S._range_arg(allowed_range, B, V, "cpu", "emu")
    rng = None if rng is None else rng.contiguous()
    mk = None if allowed_mask is None else S._mask_arg(allowed_mask, B, V, "cpu", "emu").contiguous()
    h = None if history is None else history.contiguous()
    logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64)
    probs = torch.empty(B, dtype=torch.float32)
    out = torch.empty(B, V, dtype=torch.float32)
    status = torch.empty(B, dtype=torch.int32)
    lib.emu_sample(ptr(logits), DTYPES[logits.dtype], B, V, ptr(P_), ptr(rng), ptr(mk), ptr(h),
                   0 if h is None else h.shape[1], seed, offset, int(write_probs), ptr(tokens), ptr(probs), ptr(out),
                   ptr(status))
    return (out if write_probs else (tokens, probs)), status


def data(B, V, seed, integer=False, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (B, V), generator=g).float() if integer else scale * torch.randn(B, V, generator=g)
    return x.to(dtype)


COMBOS = [{}, {"temperature": 0.5}, {"top_k": 1}, {"top_k": 7}, {"top_p": 0.0}, {"top_p": 0.3}, {"top_p": 0.9},
          {"min_p": 0.05}, {"min_p": 1.0}, {"typical_p": 0.0}, {"typical_p": 0.2}, {"typical_p": 0.9},
          {"top_k": 20, "top_p": 0.8}, {"top_p": 0.95, "typical_p": 0.7},
          {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.02, "typical_p": 0.9}]


def cid(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "plain"


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
@pytest.mark.parametrize("V,integer", [(50, False), (3000, True), (3000, False)])
def test_emulated_kept_set_equals_reference(emu, combo, V, integer):
    x = data(3, V, seed=V + len(combo), integer=integer)
    x[1, ::3] = -INF
    a, st = emu_run(emu, x, True, **combo)
    assert st.tolist() == [0, 0, 0]
    b = S.processed_probs_reference(x, **combo)
    assert torch.equal(a > 0, b > 0), combo
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_emulated_bf16_ties_penalties_mask():
    x = data(3, 2000, seed=1, dtype=torch.bfloat16, scale=3.0)
    g = torch.Generator().manual_seed(2)
    hist = torch.randint(-1, 2000, (3, 30), generator=g)
    mask = torch.rand(3, 2000, generator=g) > 0.2
    kw = dict(history=hist, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1, allowed_mask=mask,
              allowed_range=(10, 1900), top_k=40, top_p=0.9, typical_p=0.95)
    a, st = emu_run(emu_lib(), x, True, **kw)
    b = S.processed_probs_reference(x.float(), **kw)
    assert st.tolist() == [0, 0, 0]
    assert torch.equal(a > 0, b > 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


_LIB = {}


def emu_lib():
    return _LIB["lib"]


@pytest.fixture(autouse=True)
def _keep_lib(emu):
    _LIB["lib"] = emu


def test_emulated_draws_match_the_cpu_kernel():
    """Same Philox numbers and inverse-CDF order as the CPU kernel: the same tokens, except where a
    prefix sum lies within rounding of the uniform."""
    if not _ext.extension_loaded():
        pytest.skip("mmfm._C is not built")
    x = data(200, 700, seed=3)
    for combo in ({}, {"top_k": 20, "top_p": 0.9}, {"typical_p": 0.8}, {"min_p": 0.1}, {"temperature": 0.0}):
        (tok, p), st = emu_run(emu_lib(), x, False, seed=9, offset=4, **combo)
        cpu_tok, cpu_p = S.sample(x, seed=9, offset=4, return_probs=True, **combo)
        assert bool((st == 0).all())
        assert float((tok == cpu_tok).double().mean()) > 0.98, combo
        same = tok == cpu_tok
        torch.testing.assert_close(p[same], cpu_p[same], atol=1e-6, rtol=1e-4)


def test_emulated_statuses():
    x = data(4, 30, seed=4)
    x[1, 3] = float("nan")
    x[2] = -INF
    _, st = emu_run(emu_lib(), x, False, top_p=torch.tensor([0.5, 0.5, 0.5, 1.5]))
    assert st.tolist() == [0, 1, 2, 16 + 2]  # ok, NaN, no token, bad top_p
    y = torch.full((2, 64), -INF)
    y[0, 5], y[1, 63] = 1.0, -1e30
    for combo in COMBOS:
        (tok, _), st = emu_run(emu_lib(), y, False, **combo)
        assert tok.tolist() == [5, 63] and st.tolist() == [0, 0]


def test_emulated_chain_matches_cpu_kernel():
    if not _ext.extension_loaded():
        pytest.skip("mmfm._C is not built")
    B, G, V = 64, 3, 50
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(2 * torch.randn(B, G + 1, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(B, G, V, generator=g), -1)
    d = torch.stack([torch.multinomial(q[:, j], 1, generator=g).squeeze(1) for j in range(G)], 1)
    acc, nxt, st = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int32)
    emu_lib().emu_verify_chain(ptr(p), ptr(q), ptr(d), B, G, V, 3, 0, ptr(acc), ptr(nxt), ptr(st))
    cacc, cnxt = S.verify_chain(p, q, d, seed=3)
    assert bool((st == 0).all())
    assert torch.equal(acc, cacc)
    assert float((nxt == cnxt).double().mean()) > 0.95


@pytest.mark.parametrize("replacement,per_draft", [(True, False), (False, False), (True, True)])
def test_emulated_multi_draft_matches_cpu_kernel(replacement, per_draft):
    if not _ext.extension_loaded():
        pytest.skip("mmfm._C is not built")
    B, K, V = 64, 3, 40
    g = torch.Generator().manual_seed(6)
    p = torch.softmax(2 * torch.randn(B, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(B, K, V, generator=g), -1) if per_draft else \
        torch.softmax(2 * torch.randn(B, V, generator=g), -1)
    if per_draft:
        cand = torch.stack([torch.multinomial(q[:, i], 1, generator=g).squeeze(1) for i in range(K)], 1)
    else:
        cand = torch.multinomial(q, K, replacement=replacement, generator=g)
    tok, idx, st = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int32)
    emu_lib().emu_verify_multi_draft(ptr(p), ptr(q), int(per_draft), ptr(cand), B, K, V, int(replacement), 8, 1,
                                     ptr(tok), ptr(idx), ptr(st))
    ctok, cidx = S.verify_multi_draft(p, q, cand, replacement=replacement, seed=8, offset=1)
    assert bool((st == 0).all())
    assert float((idx == cidx).double().mean()) > 0.95
    assert float((tok == ctok).double().mean()) > 0.95
