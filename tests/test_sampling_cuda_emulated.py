"""The CUDA sampling kernels' block logic, run on the CPU.

tests/cuda_emu builds csrc/sampling/*_kernel.cuh with their launchers (sample_cuda.cu,
verify_cuda.cu) as plain C++ against a stand-in for the CUDA runtime (each thread a fiber,
barriers and warp shuffles as yields), so the kernels' reductions, bisection, shared-memory
sort, draws and barrier structure are checked against the references on machines without a
GPU: at the production block size (512 threads) and at 64 threads (quicker, so every mode
runs there), for fp32, bf16 and fp16 inputs. Draws use the CPU kernel's Philox numbers, and
each token that differs from the CPU kernel's is shown to sit within rounding of a CDF
boundary. It says nothing about timing, memory
coalescing or real concurrency: tests/test_sampling_cuda.py does that on a GPU. Needs g++.
"""
import ctypes
import math

import pytest
import torch
from emu_build import CXX, build_emulator

from mmfm.ops import sampling as S

if CXX is None:
    pytest.skip("no C++ compiler (g++) to build the CUDA emulation", allow_module_level=True)

SOURCES = ["tests/cuda_emu/emu_sampling.cpp", "tests/cuda_emu/cuda_runtime.h", "csrc/sampling/sampling_cuda.cuh",
           "csrc/sampling/sample_cuda_kernel.cuh", "csrc/sampling/verify_cuda_kernel.cuh",
           "csrc/sampling/sampling_common.h", "csrc/sampling/sampling_kernels.h", "csrc/common/dtype.h"]
CUDA_SOURCES = ("csrc/sampling/sample_cuda.cu", "csrc/sampling/verify_cuda.cu")
INF = math.inf
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def _load(threads):
    """threads None: the production block size; else -DMMFM_SAMPLING_CUDA_THREADS=threads."""
    lib = build_emulator(SOURCES, "mmfm_cuda_emu", CUDA_SOURCES,
                         defines=None if threads is None else {"MMFM_SAMPLING_CUDA_THREADS": threads})
    lib.emu_sample.argtypes = [P, ctypes.c_int, I64, I64, P, P, P, P, I64, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.c_int, P, P, P, P, P]
    lib.emu_verify_chain.argtypes = [P, P, ctypes.c_int, P, I64, I64, I64, ctypes.c_uint64, ctypes.c_uint64, P, P, P]
    lib.emu_verify_multi_draft.argtypes = [P, P, ctypes.c_int, ctypes.c_int, P, I64, I64, I64, ctypes.c_int,
                                           ctypes.c_uint64, ctypes.c_uint64, P, P, P]
    lib.emu_uniform.argtypes = [ctypes.c_uint64, ctypes.c_uint64, I64, ctypes.c_uint32, ctypes.c_int]
    lib.emu_uniform.restype = ctypes.c_double
    return lib


@pytest.fixture(scope="module")
def emu():
    """Two warps per block: quick, and small rows already loop over many block strides."""
    lib = _load(64)
    assert lib.emu_threads() == 64
    return lib


@pytest.fixture(scope="module")
def emu512():
    """The production block (512 threads, 16 warps): slow to emulate, so fewer rows."""
    lib = _load(None)
    assert lib.emu_threads() == 512
    return lib


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def emu_run(lib, logits, write_probs, seed=0, offset=0, allowed_range=None, allowed_mask=None, history=None,
            row_offsets=None, **params):
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
    rc = lib.emu_sample(ptr(logits), DTYPES[logits.dtype], B, V, ptr(P_), ptr(rng), ptr(mk), ptr(h),
                        0 if h is None else h.shape[1], seed, offset, int(write_probs), ptr(tokens), ptr(probs),
                        ptr(out), ptr(status), ptr(None if row_offsets is None else row_offsets.contiguous()))
    assert rc == 0, f"launch failed: {rc}"
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
    """64 threads: every mode and combination; the production block runs a subset below."""
    x = data(3, V, seed=V + len(combo), integer=integer)
    x[1, ::3] = -INF
    a, st = emu_run(emu, x, True, **combo)
    assert st.tolist() == [0, 0, 0]
    b = S.processed_probs_reference(x, **combo)
    assert torch.equal(a > 0, b > 0), combo
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_production_block_every_dtype(emu512, dtype):
    """512 threads and each logits dtype the launcher instantiates: the kept set and the
    probabilities equal the reference's on the exactly widened fp32 logits."""
    x = data(2, 3000, seed=21, dtype=dtype, scale=3.0)
    x[1, ::5] = -INF
    for combo in ({}, {"top_k": 7}, {"top_p": 0.9}, {"min_p": 0.05}, {"typical_p": 0.9}, COMBOS[-1]):
        a, st = emu_run(emu512, x, True, **combo)
        b = S.processed_probs_reference(x.float(), **combo)
        assert st.tolist() == [0, 0], combo
        assert torch.equal(a > 0, b > 0), combo
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_ties_penalties_mask(emu512, dtype):
    x = data(3, 2000, seed=1, dtype=dtype, scale=3.0)   # half precision: many exact ties
    g = torch.Generator().manual_seed(2)
    hist = torch.randint(-1, 2000, (3, 30), generator=g)
    mask = torch.rand(3, 2000, generator=g) > 0.2
    kw = dict(history=hist, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1, allowed_mask=mask,
              allowed_range=(10, 1900), top_k=40, top_p=0.9, typical_p=0.95)
    a, st = emu_run(emu512, x, True, **kw)
    b = S.processed_probs_reference(x.float(), **kw)
    assert st.tolist() == [0, 0, 0]
    assert torch.equal(a > 0, b > 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def cdf_tolerance(V):
    """How far apart two correct inverse-CDF draws can put a boundary: the kernels sum up to V
    fp32 weights (each within a few ulp of exact) in different orders, so a prefix sum of the
    normalised weights is off by at most about V * 2^-23; the bound here is 4x that."""
    return 4 * V * 2.0 ** -23


def assert_at_cdf_boundary(weights, u, a, b, what):
    """Tokens a != b were both drawn with uniform u from `weights` [V] (unnormalised, >= 0) by
    an inverse CDF in index order: that is only right if every boundary between them, the
    exact (float64) prefix sums C[min(a, b)] .. C[max(a, b) - 1], lies within rounding of u."""
    w = weights.double().clamp_min(0)
    c = torch.cumsum(w, 0) / w.sum()
    lo, hi = min(a, b), max(a, b)
    gap = float((c[lo:hi] - u).abs().max())
    assert gap <= cdf_tolerance(w.numel()), (f"{what}: tokens {a} and {b} differ with u = {u:.9f}, "
                                              f"{gap:.2e} from a boundary between them")


def check_draws(lib, x, seed, offset, combo, row_offsets=None):
    """Emulated draws against the CPU kernel's: the same Philox numbers and inverse-CDF order,
    so each differing token must sit at a CDF boundary within rounding of the uniform.
    row_offsets (int64 [B]): per-row streams, (seed, row_offsets[r], row 0), in both."""
    (tok, p), st = emu_run(lib, x, False, seed=seed, offset=offset, row_offsets=row_offsets, **combo)
    cpu_tok, cpu_p = S.sample(x, seed=seed, offset=offset if row_offsets is None else row_offsets,
                              return_probs=True, **combo)
    assert bool((st == 0).all())
    same = tok == cpu_tok
    if combo.get("temperature") == 0.0:
        assert bool(same.all())                 # greedy: no rounding to hide behind
    torch.testing.assert_close(p[same], cpu_p[same], atol=1e-6, rtol=1e-4)
    for row in (~same).nonzero().flatten().tolist():
        w = S.processed_probs_reference(x[row:row + 1].float(), **combo)[0]
        u = (lib.emu_uniform(seed, offset, row, 0, 0) if row_offsets is None
             else lib.emu_uniform(seed, int(row_offsets[row]), 0, 0, 0))
        assert_at_cdf_boundary(w, u, int(tok[row]), int(cpu_tok[row]), f"row {row} {combo}")
    return int((~same).sum())


DRAW_COMBOS = ({}, {"top_k": 20, "top_p": 0.9}, {"typical_p": 0.8}, {"min_p": 0.1}, {"temperature": 0.0})


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_draws_match_the_cpu_kernel(emu, dtype):
    x = data(200, 700, seed=3, dtype=dtype)
    mismatches = sum(check_draws(emu, x, 9, 4, combo) for combo in DRAW_COMBOS)
    assert mismatches <= 0.02 * 200 * len(DRAW_COMBOS)


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_draws_production_block(emu512, dtype):
    x = data(8, 3000, seed=13, dtype=dtype)
    for combo in ({}, {"top_k": 50, "top_p": 0.9}, {"temperature": 0.0}):
        check_draws(emu512, x, 5, 1, combo)


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_per_row_offsets(emu, emu512, dtype):
    """offset as a tensor (a draft tree's nodes keyed by position, speculative.py): each row
    draws from (seed, offset[r], row 0) in the CUDA kernel as in the CPU kernel. Repeated
    offsets make rows with the same logits draw the same token; the row index no longer matters."""
    x = data(40, 700, seed=5, dtype=dtype)
    x[20:] = x[:20]
    offs = torch.tensor([3, 4, 4, 5, 9] * 4 + [3, 4, 4, 5, 9] * 4, dtype=torch.int64)
    for combo in DRAW_COMBOS:
        check_draws(emu, x, 11, 0, combo, row_offsets=offs)
        (tok, _), _ = emu_run(emu, x, False, seed=11, row_offsets=offs, **combo)
        assert torch.equal(tok[:20], tok[20:]), combo
    check_draws(emu512, data(4, 3000, seed=6, dtype=dtype), 2, 0, {"top_p": 0.9},
                row_offsets=torch.tensor([7, 1, 7, 2], dtype=torch.int64))


def test_boundary_check_rejects_a_wrong_token():
    """The CDF check is not vacuous: a token one step off, with u away from the boundary, fails."""
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert_at_cdf_boundary(w, 0.3 + 1e-7, 1, 2, "at the boundary")
    with pytest.raises(AssertionError, match="from a boundary"):
        assert_at_cdf_boundary(w, 0.45, 1, 2, "inside token 2")


def test_emulated_statuses(emu):
    x = data(4, 30, seed=4)
    x[1, 3] = float("nan")
    x[2] = -INF
    _, st = emu_run(emu, x, False, top_p=torch.tensor([0.5, 0.5, 0.5, 1.5]))
    assert st.tolist() == [0, 1, 2, 16 + 2]  # ok, NaN, no token, bad top_p
    y = torch.full((2, 64), -INF)
    y[0, 5], y[1, 63] = 1.0, -1e30
    for combo in COMBOS:
        (tok, _), st = emu_run(emu, y, False, **combo)
        assert tok.tolist() == [5, 63] and st.tolist() == [0, 0]


def chain_case(B, G, V, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(B, G + 1, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(B, G, V, generator=g), -1)
    d = torch.stack([torch.multinomial(q[:, j], 1, generator=g).squeeze(1) for j in range(G)], 1)
    return p.to(dtype), q.to(dtype), d


def run_chain(lib, p, q, d, seed):
    B, G, V = q.shape
    acc, nxt, st = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int32)
    assert lib.emu_verify_chain(ptr(p), ptr(q), DTYPES[p.dtype], ptr(d), B, G, V, seed, 0, ptr(acc), ptr(nxt),
                                ptr(st)) == 0
    assert bool((st == 0).all())
    return acc, nxt


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [64, 512])
def test_emulated_chain_matches_cpu_kernel(emu, emu512, threads, dtype):
    """Acceptances are equal; a differing next token sits at a boundary of the CDF it was drawn
    from (the residual max(0, p_j - q_j) after a rejection at j, p_G after G acceptances)."""
    lib, B = (emu, 64) if threads == 64 else (emu512, 12)
    p, q, d = chain_case(B, 3, 50, 5, dtype)
    acc, nxt = run_chain(lib, p, q, d, 3)
    cacc, cnxt = S.verify_chain(p, q, d, seed=3)
    assert torch.equal(acc, cacc)
    G = q.shape[1]
    for b in (nxt != cnxt).nonzero().flatten().tolist():
        j = int(acc[b])
        if j == G:
            w, u = p[b, G].double(), emu.emu_uniform(3, 0, b, G, 0)
        else:
            w = (p[b, j].double() - q[b, j].double()).clamp_min(0)
            w = w if float(w.sum()) > 0 else p[b, j].double()
            u = emu.emu_uniform(3, 0, b, j, 1)
        assert_at_cdf_boundary(w, u, int(nxt[b]), int(cnxt[b]), f"chain row {b}")


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("replacement,per_draft", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_multi_draft_matches_cpu_kernel(emu, emu512, replacement, per_draft, dtype):
    for lib, B in ((emu, 64), (emu512, 8)):
        K, V = 3, 40
        g = torch.Generator().manual_seed(6)
        p = torch.softmax(2 * torch.randn(B, V, generator=g), -1)
        q = torch.softmax(2 * torch.randn(B, K, V, generator=g), -1) if per_draft else \
            torch.softmax(2 * torch.randn(B, V, generator=g), -1)
        if per_draft:
            cand = torch.stack([torch.multinomial(q[:, i], 1, generator=g).squeeze(1) for i in range(K)], 1)
        else:
            cand = torch.multinomial(q, K, replacement=replacement, generator=g)
        p, q = p.to(dtype), q.to(dtype)
        tok, idx = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)
        st = torch.empty(B, dtype=torch.int32)
        assert lib.emu_verify_multi_draft(ptr(p), ptr(q), DTYPES[dtype], int(per_draft), ptr(cand), B, K, V,
                                          int(replacement), 8, 1, ptr(tok), ptr(idx), ptr(st)) == 0
        ctok, cidx = S.verify_multi_draft(p, q, cand, replacement=replacement, seed=8, offset=1)
        assert bool((st == 0).all())
        # acceptance compares u * q_i(x) * R_i with r_i(x): it can flip only at a rounding tie
        assert float((idx == cidx).double().mean()) > 0.95
        hit = (idx >= 0) & (idx == cidx)
        assert torch.equal(tok[hit], ctok[hit])     # an accepted candidate is that candidate
        assert float((tok == ctok).double().mean()) > 0.95
