"""The CUDA quantization kernels (csrc/quant/*_cuda.cu), launchers included, run on the CPU.

tests/emu_build.py compiles every quant .cu as plain C++ against the stand-in CUDA runtime in
tests/cuda_emu (each thread a fiber, barriers and warp shuffles as yields) with the production
block sizes, so the tiled nearest-code search (top-1 and top-k lists, the split-K merge, the
staged D chunks), the EMA sort-and-segment statistics, FSQ, LFQ with its entropy partials and
gradient, and residual VQ are checked against the pure-torch references in mmfm/ops/quant.py
for every dtype the kernels read (fp32, bf16, fp16). The one library call, CUB's radix sort,
is a stand-in (tests/cuda_emu/cub). It says nothing about timing, coalescing, real
concurrency or --use_fast_math: tests/test_quant_cuda.py does that on a GPU. Needs g++.
Shapes are small (a block is 256 fibers): each case runs in well under a second.
"""
import ctypes
import glob
import os

import pytest
import torch
from emu_build import CXX, ROOT, build_emulator
from test_quant_cuda import (_entropy_reference_and_grad, _near_rounding_boundary, assert_near_best,
                             randint_like_float, with_duplicates)

from mmfm.ops import quant as Q

if CXX is None:
    pytest.skip("no C++ compiler (g++) to build the CUDA emulation", allow_module_level=True)

CUDA_SOURCES = tuple(sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc/quant/*_cuda.cu"))))
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = list(DT)
INVALID_VALUE = 1  # cudaErrorInvalidValue
SIGNATURES = {
    "emu_nearest_code": [P, P, I32, I64, I64, I64, I64, I32, P, P],
    "emu_code_stats": [P, I32, P, I64, I64, I64, P, P],
    "emu_ema_update": [P, P, P, P, I64, I64, F32, F32, F32, P, P, P, P],
    "emu_fsq_quantize": [P, I32, P, I64, I64, P, P],
    "emu_fsq_indices_to_codes": [P, P, I64, I64, P],
    "emu_fsq_codes_to_indices": [P, P, I64, I64, P],
    "emu_lfq_quantize": [P, I32, I64, I64, P, P],
    "emu_lfq_indices_to_codes": [P, I64, I64, P],
    "emu_lfq_entropy": [P, I64, I64, F32, I32, P],
    "emu_lfq_entropy_backward": [P, I64, I64, F32, I32, P, P],
    "emu_residual_vq": [P, P, I32, I64, I64, I64, I64, P, P, P],
}


@pytest.fixture(scope="module")
def emu():
    lib = build_emulator(["tests/cuda_emu/emu_quant.cpp"], "mmfm_quant_emu", CUDA_SOURCES)
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = I32
    lib.emu_set_sms.argtypes = [I32]
    yield lib
    lib.emu_set_sms(132)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def nearest(lib, z, e, topk, cosine=False, sms=132):
    """The emulated op; sms sets the multiprocessor count the launcher sees (few: split-K)."""
    z, e = z.contiguous(), e.contiguous()
    N, D = z.shape
    idx = torch.full((N, topk), -5, dtype=torch.int64)
    dist = torch.full((N, topk), float("nan"))
    lib.emu_set_sms(sms)
    rc = lib.emu_nearest_code(ptr(z), ptr(e), DT[z.dtype], N, e.shape[0], D, topk, int(cosine), ptr(idx), ptr(dist))
    lib.emu_set_sms(132)
    assert rc == 0, rc
    return idx, dist


def splits(N, K, sms):
    """The number of code ranges nearest_code_cuda splits the codebook into (its heuristic)."""
    row_tiles, code_tiles = -(-N // 64), -(-K // 64)
    if row_tiles >= 4 * sms:
        return 1
    S = min(-(-4 * sms // row_tiles), max(code_tiles // 4, 1))
    per = -(-code_tiles // S)
    return -(-code_tiles // per)


# ------------------------------------------------------------------------------- nearest_code
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D,sms", [(1, 1, 13, 132), (70, 3, 1, 132), (130, 200, 20, 132),  # rows over tiles
                                       (5, 1100, 6, 4),     # few rows, many codes: split-K merge
                                       (65, 600, 37, 1)])   # D over three staged chunks, split
@pytest.mark.parametrize("topk", [1, 5])
def test_nearest_code_exact_on_integers(emu, dtype, N, K, D, sms, topk):
    topk = min(topk, K)
    z = randint_like_float((N, D), -3, 3, 1, dtype)
    e = with_duplicates(randint_like_float((K, D), -3, 3, 2, dtype))   # exact ties: the lowest index wins
    idx, dist = nearest(emu, z, e, topk, sms=sms)
    idx_ref, dist_ref = Q.nearest_code_reference(z, e, topk, False)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(dist, dist_ref)


def test_nearest_code_cases_reach_the_split_merge():
    assert splits(5, 1100, 4) > 1 and splits(65, 600, 1) > 1 and splits(130, 200, 132) == 1


@pytest.mark.parametrize("topk", [2, 17, 64])
def test_nearest_code_topk_order_and_ties(emu, topk):
    z = randint_like_float((70, 6), -1, 1, 3)
    e = with_duplicates(randint_like_float((700, 6), -1, 1, 4))
    for sms in (132, 2):
        idx, dist = nearest(emu, z, e, topk, sms=sms)
        idx_ref, dist_ref = Q.nearest_code_reference(z, e, topk, False)
        assert torch.equal(idx, idx_ref) and torch.equal(dist, dist_ref), sms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [1, 4])
def test_nearest_code_random_and_cosine(emu, dtype, topk):
    g = gen(5)
    z = (torch.randn(90, 24, generator=g) * 3).to(dtype)
    e = with_duplicates(torch.randn(300, 24, generator=g)).to(dtype)
    idx, dist = nearest(emu, z, e, topk)
    assert_near_best(z.float(), e.float(), idx, dist, topk, False, atol=2e-4 * 24)
    z[0] = 0  # a zero row stays zero under cosine: every distance is 1
    idx, dist = nearest(emu, z, e, topk, cosine=True, sms=2)
    torch.testing.assert_close(dist[0], torch.ones(topk), atol=1e-5, rtol=0)
    assert_near_best(z[1:].float(), e.float(), idx[1:], dist[1:], topk, True, atol=1e-4)


def test_nearest_code_bad_arguments_are_errors(emu):
    z, e = torch.randn(4, 8), torch.randn(100, 8)
    idx, dist = torch.empty(4, 65, dtype=torch.int64), torch.empty(4, 65)
    assert emu.emu_nearest_code(ptr(z), ptr(e), 0, 4, 100, 8, 65, 0, ptr(idx), ptr(dist)) == INVALID_VALUE
    assert emu.emu_nearest_code(ptr(z), ptr(e), 0, 4, 0, 8, 1, 0, ptr(idx), ptr(dist)) == INVALID_VALUE


# ------------------------------------------------------------------------- code_stats and EMA
def code_stats(lib, z, idx, K):
    N, D = z.shape
    sums, counts = torch.full((K, D), float("nan")), torch.full((K,), float("nan"))
    assert lib.emu_code_stats(ptr(z), DT[z.dtype], ptr(idx), N, K, D, ptr(sums), ptr(counts)) == 0
    return sums, counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D", [(300, 37, 5), (200, 1, 3), (257, 700, 2)])
def test_code_stats_exact(emu, dtype, N, K, D):
    z = (torch.randint(-64, 65, (N, D), generator=gen(9)).float() / 8).to(dtype)  # every partial sum exact
    idx = torch.randint(0, K, (N,), generator=gen(10))
    idx[::3] = min(2, K - 1)   # one crowded code
    sums, counts = code_stats(emu, z, idx, K)
    sums_ref, counts_ref = Q.code_stats_reference(z, idx, K)
    assert torch.equal(sums, sums_ref) and torch.equal(counts, counts_ref)


@pytest.mark.usefixtures("needs_extension")
@pytest.mark.parametrize("dtype", DTYPES)
def test_code_stats_same_bits_as_the_cpu_kernel(emu, dtype):
    """Each code sums its rows in row order on both sides: random fp32 sums agree bit for bit.
    (The op takes fp32 and bf16; fp16, which the kernels can read, is compared through its exact
    fp32 widening.)"""
    z = torch.randn(400, 16, generator=gen(11)).to(dtype)
    idx = torch.randint(0, 30, (400,), generator=gen(12))
    sums, counts = code_stats(emu, z, idx, 30)
    want = torch.ops.mmfm.code_stats(z.float() if dtype == torch.float16 else z, idx, 30)
    assert torch.equal(sums, want[0]) and torch.equal(counts, want[1])
    empty_sums, empty_counts = code_stats(emu, torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=torch.int64), 6)
    assert not empty_sums.any() and not empty_counts.any()


@pytest.mark.parametrize("K,D", [(1, 3), (300, 8), (2500, 2)])   # K > 1024: the size loop wraps
def test_ema_codebook_update(emu, K, D):
    g = gen(13)
    size, esum = torch.rand(K, generator=g) * 4, torch.randn(K, D, generator=g)
    counts, sums = torch.randint(0, 5, (K,), generator=g).float(), torch.randn(K, D, generator=g)
    out = [torch.full((K,), float("nan")), torch.full((K, D), float("nan")), torch.full((K, D), float("nan")),
           torch.zeros(K, dtype=torch.bool)]
    args = (0.9, 1e-5, 1.0)
    assert emu.emu_ema_update(ptr(size), ptr(esum), ptr(counts), ptr(sums), K, D, *args, *map(ptr, out)) == 0
    ref = Q.ema_codebook_update_reference(size, esum, counts, sums, *args)
    for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), out[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    near = (ref[0] - 1.0).abs() < 1e-5     # the dead flag may differ only at the threshold
    assert torch.equal(out[3][~near], ref[3][~near])


# ---------------------------------------------------------------------------------------- FSQ
FSQ_LEVELS = [[8, 5, 5, 5], [7, 5, 5, 5, 5], [2, 3, 4, 1000]]


@pytest.mark.parametrize("levels", FSQ_LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fsq_quantize(emu, levels, dtype):
    lv = torch.tensor(levels)
    N, C = 700, len(levels)
    z = (torch.randn(N, C, generator=gen(14)) * 1.5).to(dtype)
    codes, idx = torch.full((N, C), float("nan")), torch.full((N,), -5, dtype=torch.int64)
    assert emu.emu_fsq_quantize(ptr(z), DT[dtype], ptr(lv), N, C, ptr(codes), ptr(idx)) == 0
    codes_ref, idx_ref = Q.fsq_quantize_reference(z, lv)
    near = _near_rounding_boundary(z.float(), lv)
    assert near.float().mean() < 0.01
    assert torch.equal(codes[~near], codes_ref[~near])
    assert torch.equal(idx[~near.any(1)], idx_ref[~near.any(1)])


@pytest.mark.parametrize("levels", FSQ_LEVELS)
def test_fsq_indices_and_codes_roundtrip(emu, levels):
    lv = torch.tensor(levels)
    C, size, N = len(levels), int(torch.prod(torch.tensor(levels))), 600
    idx = torch.randint(0, size, (N,), generator=gen(15))
    idx[:2] = torch.tensor([0, size - 1])
    codes = torch.full((N, C), float("nan"))
    assert emu.emu_fsq_indices_to_codes(ptr(idx), ptr(lv), N, C, ptr(codes)) == 0
    assert torch.equal(codes, Q.fsq_indices_to_codes_reference(idx, lv))
    noisy = codes + (torch.rand(codes.shape, generator=gen(16)) - 0.5) * 0.6   # off grid: snap to the nearest level
    noisy[0], noisy[1] = 3.0, -3.0                                              # past the ends: the edge
    for c, want in ((codes, idx), (noisy, Q.fsq_codes_to_indices_reference(noisy, lv))):
        back = torch.full((N,), -5, dtype=torch.int64)
        assert emu.emu_fsq_codes_to_indices(ptr(c.contiguous()), ptr(lv), N, C, ptr(back)) == 0
        assert torch.equal(back, want)
    assert emu.emu_fsq_indices_to_codes(ptr(idx), ptr(lv), N, 65, ptr(codes)) == INVALID_VALUE  # C > 64


# ---------------------------------------------------------------------------------------- LFQ
@pytest.mark.parametrize("d", [1, 8, 24, 62])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lfq_quantize_and_indices(emu, d, dtype):
    N = 300
    z = torch.randn(N, d, generator=gen(17)).to(dtype)
    z[0] = 0   # zero is not positive: -1, bit 0
    codes, idx = torch.full((N, d), float("nan")), torch.full((N,), -5, dtype=torch.int64)
    assert emu.emu_lfq_quantize(ptr(z), DT[dtype], N, d, ptr(codes), ptr(idx)) == 0
    codes_ref, idx_ref = Q.lfq_quantize_reference(z)
    assert torch.equal(codes, codes_ref) and torch.equal(idx, idx_ref)
    back = torch.full((N, d), float("nan"))
    assert emu.emu_lfq_indices_to_codes(ptr(idx), N, d, ptr(back)) == 0
    assert torch.equal(back, Q.lfq_indices_to_codes_reference(idx_ref, d))


@pytest.mark.parametrize("N,d,exact,tau", [(100, 8, True, 1.0), (1, 8, True, 1.0), (70, 13, True, 1.3),
                                           (90, 5, True, 0.5), (600, 24, False, 1.0), (7, 24, False, 2.0)])
def test_lfq_entropy_forward_and_backward(emu, N, d, exact, tau):
    z = torch.randn(N, d, generator=gen(18)) * 0.7
    for g in (torch.tensor([1.3, -0.7]), torch.tensor([1.0, 0.0])):   # g1 = 0: the per-sample term alone
        out_ref, grad_ref = _entropy_reference_and_grad(z, tau, exact, g)
        out, grad = torch.full((2,), float("nan")), torch.full((N, d), float("nan"))
        assert emu.emu_lfq_entropy(ptr(z), N, d, tau, int(exact), ptr(out)) == 0
        assert emu.emu_lfq_entropy_backward(ptr(z), N, d, tau, int(exact), ptr(g), ptr(grad)) == 0
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, grad_ref, rtol=2e-3, atol=1e-4 * grad_ref.abs().max().item())
    assert emu.emu_lfq_entropy(ptr(z), N, 17, tau, 1, ptr(out)) == INVALID_VALUE   # exact needs d <= 16


# -------------------------------------------------------------------------------- residual VQ
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,M,K,D", [(1, 1, 1, 13), (130, 3, 64, 7), (9, 2, 700, 5)])
def test_residual_vq_exact_on_integers(emu, dtype, N, M, K, D):
    z = randint_like_float((N, D), -8, 8, 20, dtype)
    cb = torch.stack([with_duplicates(randint_like_float((K, D), -3, 3, 21 + m, dtype)) for m in range(M)])
    idx, q, norms = torch.full((N, M), -5, dtype=torch.int64), torch.full((N, D), float("nan")), torch.empty(N, M)
    assert emu.emu_residual_vq(ptr(z), ptr(cb), DT[dtype], N, M, K, D, ptr(idx), ptr(q), ptr(norms)) == 0
    idx_ref, q_ref, norms_ref = Q.residual_vq_reference(z, cb)
    assert torch.equal(idx, idx_ref) and torch.equal(q, q_ref) and torch.equal(norms, norms_ref)
