"""CUDA kernels of the quantization ops (csrc/quant/*_cuda.cu) against the pure-torch
references in mmfm/ops/quant.py, evaluated on the CPU.

Exact equality where the arithmetic is exact (integer-valued inputs, integer outputs, sums
of dyadic values); tolerances elsewhere, with index checks that accept a different index
only when its reference distance ties the best one. Every GPU test is skipped, with the
reason, when there is no CUDA device or mmfm._C was built without its CUDA kernels.
test_cuda_sources_compile needs no GPU: it runs tools/check_cuda.py (nvcc only).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import mmfm.ops
from mmfm.ops import quant as Q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not mmfm.ops.with_cuda():
        return "mmfm._C built without CUDA kernels"
    return None


_REASON = _skip_reason()
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
cuda = pytest.mark.cuda
DEV = "cuda"
ops = torch.ops.mmfm


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randint_like_float(shape, lo: int, hi: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Integer-valued floats in [lo, hi]: dot products and norms stay exact in fp32 (and bf16 inputs are exact)."""
    return torch.randint(lo, hi + 1, shape, generator=gen(seed)).to(dtype)


def with_duplicates(e: torch.Tensor) -> torch.Tensor:
    """Copies of earlier codes at later indices, so ties must resolve to the lowest index."""
    e = e.clone()
    K = e.shape[0]
    if K >= 4:
        src = torch.arange(K // 2, K) % (K // 2)
        e[K // 2:] = e[src]
    return e


def assert_near_best(z, e, idx_op, dist_op, topk, cosine, atol, rtol=1e-4):
    """Indices may differ from the reference only where the reference distances tie."""
    idx_ref, dist_ref = Q.nearest_code_reference(z.cpu(), e.cpu(), topk, cosine)
    idx_op, dist_op = idx_op.cpu(), dist_op.cpu()
    assert idx_op.shape == idx_ref.shape and idx_op.dtype == torch.int64
    assert bool(((idx_op >= 0) & (idx_op < e.shape[0])).all())
    torch.testing.assert_close(dist_op, dist_ref, atol=atol, rtol=rtol)
    # Distances of the chosen codes, recomputed in float64, must match the reference's choice.
    zz, ee = z.cpu().double(), e.cpu().double()
    if cosine:
        zz = torch.nn.functional.normalize(zz, dim=-1, eps=1e-12)
        ee = torch.nn.functional.normalize(ee, dim=-1, eps=1e-12)
    full = torch.cdist(zz, ee).pow(2)
    chosen = full.gather(1, idx_op)
    best = full.gather(1, idx_ref)
    assert bool((chosen <= best + atol + rtol * best.abs()).all())
    same = (idx_op == idx_ref).double().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the indices equal the reference's"


# ---------------------------------------------------------------------------- nearest_code
NEAREST_SHAPES = [  # (N, K, D)
    (1, 1, 13),
    (1, 7, 13),
    (5, 1, 13),
    (70, 3, 1),
    (300, 257, 13),
    (3, 5000, 16),       # few rows, many codes: the codebook is split over blocks
    (20000, 600, 8),     # many row tiles
    (129, 1000, 70),     # D spans several staged chunks
]


@cuda
@needs_cuda
@pytest.mark.parametrize("N,K,D", NEAREST_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 5])
def test_nearest_code_exact_on_integers(N, K, D, dtype, topk):
    topk = min(topk, K)
    z = randint_like_float((N, D), -3, 3, 1, dtype)
    e = with_duplicates(randint_like_float((K, D), -3, 3, 2, dtype))
    idx, dist = ops.nearest_code(z.to(DEV), e.to(DEV), topk, False)
    idx_ref, dist_ref = Q.nearest_code_reference(z, e, topk, False)
    assert torch.equal(idx.cpu(), idx_ref)
    assert torch.equal(dist.cpu(), dist_ref)


@cuda
@needs_cuda
@pytest.mark.parametrize("topk", [1, 2, 17, 64])
def test_nearest_code_topk_order_and_ties(topk):
    # Many equal distances: the list must be ascending with ties in index order.
    z = randint_like_float((257, 6), -1, 1, 3)
    e = with_duplicates(randint_like_float((900, 6), -1, 1, 4))
    idx, dist = ops.nearest_code(z.to(DEV), e.to(DEV), topk, False)
    idx_ref, dist_ref = Q.nearest_code_reference(z, e, topk, False)
    assert torch.equal(idx.cpu(), idx_ref)
    assert torch.equal(dist.cpu(), dist_ref)


@cuda
@needs_cuda
def test_nearest_code_topk_above_limit_is_an_error():
    # The CUDA kernel keeps per-thread sorted lists of at most 64 entries.
    z = torch.randn(4, 8, device=DEV)
    e = torch.randn(100, 8, device=DEV)
    with pytest.raises(ValueError, match="'topk' must be <= 64 for CUDA"):
        ops.nearest_code(z, e, 65, False)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-3)])
@pytest.mark.parametrize("topk", [1, 4])
@pytest.mark.parametrize("N,K,D", [(2048, 1024, 64), (7, 4096, 32), (1, 1, 13)])
def test_nearest_code_random(dtype, atol, topk, N, K, D):
    topk = min(topk, K)
    g = gen(5)
    z = torch.randn(N, D, generator=g).to(dtype)
    e = torch.randn(K, D, generator=g).to(dtype)
    idx, dist = ops.nearest_code(z.to(DEV), e.to(DEV), topk, False)
    assert_near_best(z.float(), e.float(), idx, dist, topk, False, atol=atol * D)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 3])
def test_nearest_code_cosine(dtype, topk):
    g = gen(6)
    z = torch.randn(500, 24, generator=g).to(dtype) * 3
    e = with_duplicates(torch.randn(300, 24, generator=g)).to(dtype)
    z[0] = 0  # a zero row stays zero: every distance is 1
    idx, dist = ops.nearest_code(z.to(DEV), e.to(DEV), topk, True)
    assert torch.allclose(dist[0].cpu(), torch.ones(topk), atol=1e-5)
    assert_near_best(z[1:].float(), e.float(), idx[1:], dist[1:], topk, True, atol=1e-4)


@cuda
@needs_cuda
def test_nearest_code_wrapper_on_cuda():
    z = randint_like_float((2, 3, 10), -2, 2, 7)
    e = with_duplicates(randint_like_float((50, 10), -2, 2, 8))
    idx, dist = Q.nearest_code(z.to(DEV), e.to(DEV), topk=1)
    idx_ref, dist_ref = Q.nearest_code_reference(z.reshape(-1, 10), e)
    assert idx.device.type == torch.device(DEV).type and idx.shape == (2, 3)
    assert torch.equal(idx.cpu().reshape(-1), idx_ref[:, 0])
    assert torch.equal(dist.cpu().reshape(-1), dist_ref[:, 0])


# ------------------------------------------------------------------------------ code_stats
def _assignments(N: int, K: int, seed: int) -> torch.Tensor:
    idx = torch.randint(0, K, (N,), generator=gen(seed))
    idx[::3] = min(2, K - 1)  # one crowded code
    return idx


@cuda
@needs_cuda
@pytest.mark.parametrize("N,K,D", [(1000, 37, 5), (5000, 1, 3), (257, 4096, 2), (20000, 512, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code_stats_exact(N, K, D, dtype):
    # Multiples of 1/8 of modest size: every partial sum is exact, whatever the order.
    z = (torch.randint(-64, 65, (N, D), generator=gen(9)).float() / 8).to(dtype)
    idx = _assignments(N, K, 10)
    sums, counts = ops.code_stats(z.to(DEV), idx.to(DEV), K)
    sums_ref, counts_ref = Q.code_stats_reference(z, idx, K)
    assert torch.equal(sums.cpu(), sums_ref)
    assert torch.equal(counts.cpu(), counts_ref)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code_stats_deterministic(dtype):
    N, K, D = 30000, 300, 32
    z = torch.randn(N, D, generator=gen(11)).to(dtype)
    idx = _assignments(N, K, 12)
    zd, idd = z.to(DEV), idx.to(DEV)
    s1, c1 = ops.code_stats(zd, idd, K)
    s2, c2 = ops.code_stats(zd, idd, K)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)  # bit-identical run to run
    sums_ref, counts_ref = Q.code_stats_reference(z, idx, K)
    torch.testing.assert_close(s1.cpu(), sums_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(c1.cpu(), counts_ref)
    # Each code sums its rows in row order, as the CPU kernel does: the same bits.
    s_cpu, c_cpu = ops.code_stats(z, idx, K)
    assert torch.equal(s1.cpu(), s_cpu) and torch.equal(c1.cpu(), c_cpu)


@cuda
@needs_cuda
def test_code_stats_no_rows():
    sums, counts = ops.code_stats(torch.zeros(0, 4, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV), 6)
    assert torch.equal(sums.cpu(), torch.zeros(6, 4)) and torch.equal(counts.cpu(), torch.zeros(6))


# ---------------------------------------------------------------------- ema_codebook_update
@cuda
@needs_cuda
@pytest.mark.parametrize("K,D", [(1, 3), (512, 64), (70000, 2)])
def test_ema_codebook_update(K, D):
    g = gen(13)
    size = torch.rand(K, generator=g) * 4
    esum = torch.randn(K, D, generator=g)
    counts = torch.randint(0, 5, (K,), generator=g).float()
    sums = torch.randn(K, D, generator=g)
    args = (0.9, 1e-5, 1.0)
    out = ops.ema_codebook_update(size.to(DEV), esum.to(DEV), counts.to(DEV), sums.to(DEV), *args)
    ref = Q.ema_codebook_update_reference(size, esum, counts, sums, *args)
    for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), out[:3], ref[:3]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, msg=name)
    near = (ref[0] - 1.0).abs() < 1e-5  # the dead flag may differ only at the threshold
    assert torch.equal(out[3].cpu()[~near], ref[3][~near])
    again = ops.ema_codebook_update(size.to(DEV), esum.to(DEV), counts.to(DEV), sums.to(DEV), *args)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


# ------------------------------------------------------------------------------------- FSQ
FSQ_LEVELS = [[8, 5, 5, 5], [7, 5, 5, 5, 5], [2, 3, 4, 1000], [8, 8, 8, 6, 5]]


def _near_rounding_boundary(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Elements whose bounded value lies near a half-integer (computed in float64): there
    fp32 tanh implementations, a few ulp apart, may legitimately round either way. The
    margin scales with half_l, the size of the bounded value."""
    lv = levels.double()
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).double()
    b = torch.tanh(z.double() + torch.atanh(offset / half_l)) * half_l - offset
    return ((b - b.floor()) - 0.5).abs() < 1e-5 * (1 + half_l)


@cuda
@needs_cuda
@pytest.mark.parametrize("levels", FSQ_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsq_quantize(levels, dtype):
    lv = torch.tensor(levels)
    z = (torch.randn(20000, len(levels), generator=gen(14)) * 1.5).to(dtype)
    codes, idx = ops.fsq_quantize(z.to(DEV), lv)
    codes_ref, idx_ref = Q.fsq_quantize_reference(z, lv)
    near = _near_rounding_boundary(z.float(), lv)
    assert near.float().mean() < 0.01
    ok = ~near
    assert torch.equal(codes.cpu()[ok], codes_ref[ok])
    rows = ~near.any(1)
    assert torch.equal(idx.cpu()[rows], idx_ref[rows])


@cuda
@needs_cuda
@pytest.mark.parametrize("levels", FSQ_LEVELS)
def test_fsq_indices_and_codes_roundtrip(levels):
    lv = torch.tensor(levels)
    size = int(torch.prod(lv))
    idx = torch.randint(0, size, (10000,), generator=gen(15))
    idx[:2] = torch.tensor([0, size - 1])
    codes = ops.fsq_indices_to_codes(idx.to(DEV), lv)
    codes_ref = Q.fsq_indices_to_codes_reference(idx, lv)
    assert torch.equal(codes.cpu(), codes_ref)
    back = ops.fsq_codes_to_indices(codes, lv)
    assert torch.equal(back.cpu(), idx)
    # Off-grid codes snap to the nearest level, past the ends to the edge.
    noisy = codes_ref + (torch.rand(codes_ref.shape, generator=gen(16)) - 0.5) * 0.6
    noisy[0] = 3.0
    noisy[1] = -3.0
    got = ops.fsq_codes_to_indices(noisy.to(DEV), lv)
    assert torch.equal(got.cpu(), Q.fsq_codes_to_indices_reference(noisy, lv))


# ------------------------------------------------------------------------------------- LFQ
@cuda
@needs_cuda
@pytest.mark.parametrize("d", [1, 8, 24, 62])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lfq_quantize_and_indices(d, dtype):
    z = torch.randn(5000, d, generator=gen(17)).to(dtype)
    z[0] = 0  # zero is not positive: -1, bit 0
    codes, idx = ops.lfq_quantize(z.to(DEV))
    codes_ref, idx_ref = Q.lfq_quantize_reference(z)
    assert torch.equal(codes.cpu(), codes_ref) and torch.equal(idx.cpu(), idx_ref)
    back = ops.lfq_indices_to_codes(idx, d)
    assert torch.equal(back.cpu(), Q.lfq_indices_to_codes_reference(idx_ref, d))


LFQ_CASES = [  # (N, d, exact, temperature)
    (512, 8, True, 1.0),
    (3000, 8, True, 0.5),
    (1, 8, True, 1.0),
    (300, 13, True, 1.3),
    (512, 16, True, 1.0),     # the reference forms N x 2^16 logits: keep N modest
    (4096, 24, False, 1.0),
    (7, 24, False, 2.0),
]


def _entropy_reference_and_grad(z: torch.Tensor, tau: float, exact: bool, g: torch.Tensor):
    zr = z.clone().requires_grad_(True)
    out = Q.lfq_entropy_reference(zr, tau, exact)
    (out * g).sum().backward()
    return out.detach(), zr.grad


@cuda
@needs_cuda
@pytest.mark.parametrize("N,d,exact,tau", LFQ_CASES)
def test_lfq_entropy_forward_and_backward(N, d, exact, tau):
    z = torch.randn(N, d, generator=gen(18)) * 0.7
    g = torch.tensor([1.3, -0.7])
    out_ref, grad_ref = _entropy_reference_and_grad(z, tau, exact, g)
    out = ops.lfq_entropy(z.to(DEV), tau, exact)
    torch.testing.assert_close(out.cpu(), out_ref, rtol=1e-4, atol=1e-4)
    grad = ops.lfq_entropy_backward(g.to(DEV), z.to(DEV), tau, exact)
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad.cpu(), grad_ref, rtol=2e-3, atol=1e-4 * scale)
    # Deterministic, and g1 = 0 leaves only the per-sample term.
    assert torch.equal(ops.lfq_entropy(z.to(DEV), tau, exact), out)
    g0 = torch.tensor([1.0, 0.0])
    _, grad0_ref = _entropy_reference_and_grad(z, tau, exact, g0)
    grad0 = ops.lfq_entropy_backward(g0.to(DEV), z.to(DEV), tau, exact)
    torch.testing.assert_close(grad0.cpu(), grad0_ref, rtol=2e-3, atol=1e-4 * grad0_ref.abs().max().item())


@cuda
@needs_cuda
@pytest.mark.parametrize("d", [8, 24])
def test_lfq_entropy_wrapper_autograd_on_cuda(d):
    z = torch.randn(4, 64, d, generator=gen(19))
    zc = z.to(DEV).clone().requires_grad_(True)
    sample, codebook = Q.lfq_entropy(zc, temperature=1.0)
    (sample - codebook).backward()
    zr = z.reshape(-1, d).clone().requires_grad_(True)
    ref = Q.lfq_entropy_reference(zr, 1.0, d <= 16)
    (ref[0] - ref[1]).backward()
    torch.testing.assert_close(torch.stack([sample, codebook]).detach().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    scale = zr.grad.abs().max().item()
    torch.testing.assert_close(zc.grad.cpu().reshape(-1, d), zr.grad, rtol=2e-3, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- residual VQ
@cuda
@needs_cuda
@pytest.mark.parametrize("N,M,K,D", [(1, 1, 1, 13), (500, 4, 64, 7), (70, 3, 1000, 5), (20000, 2, 256, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_vq_exact_on_integers(N, M, K, D, dtype):
    z = randint_like_float((N, D), -8, 8, 20, dtype)
    cb = torch.stack([with_duplicates(randint_like_float((K, D), -3, 3, 21 + m, dtype)) for m in range(M)])
    idx, q, norms = ops.residual_vq(z.to(DEV), cb.to(DEV))
    idx_ref, q_ref, norms_ref = Q.residual_vq_reference(z, cb)
    assert torch.equal(idx.cpu(), idx_ref)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(norms.cpu(), norms_ref)


@cuda
@needs_cuda
def test_residual_vq_random():
    g = gen(22)
    z = torch.randn(4000, 32, generator=g)
    cb = torch.randn(3, 512, 32, generator=g) * torch.tensor([1.0, 0.5, 0.25])[:, None, None]
    idx, q, norms = ops.residual_vq(z.to(DEV), cb.to(DEV))
    idx_ref, q_ref, norms_ref = Q.residual_vq_reference(z, cb)
    assert (idx.cpu()[:, 0] == idx_ref[:, 0]).float().mean() > 0.99
    rows = (idx.cpu() == idx_ref).all(1)  # rows whose path matches: same sums up to rounding
    assert rows.float().mean() > 0.97
    torch.testing.assert_close(q.cpu()[rows], q_ref[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.cpu()[rows], norms_ref[rows], rtol=1e-4, atol=1e-4)
    # Whatever the path, the reported norm is that of z minus the reported quantization.
    torch.testing.assert_close(norms.cpu()[:, -1], ((z - q.cpu()) ** 2).sum(1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------- compile check (no GPU needed)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile():
    """Every csrc/**/*.cu compiles with nvcc for sm_80 and sm_90, warnings as errors."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_cuda.py")], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout
    assert "compiled" in proc.stdout



@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_binding_cuda_blocks_are_compiled(tmp_path):
    """tools/check_cuda.py compiles the bindings' #ifdef MMFM_WITH_CUDA blocks (syntax only,
    CPU torch headers plus tools/cuda_syntax_include): a typo that only the CUDA build would
    see fails it. (test_cuda_sources_compile runs the same check on the real bindings.)"""
    src = open(os.path.join(ROOT, "csrc", "quant", "quant_binding.cpp")).read()
    assert src.count("cuda_ok(nearest_code_cuda(") == 1
    bad = tmp_path / "quant_binding.cpp"
    bad.write_text(src.replace("cuda_ok(nearest_code_cuda(", "cuda_ok(nearest_code_cudaa("))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_cuda.py"), "--bindings-only", str(bad)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout
    assert "nearest_code_cudaa" in proc.stdout and "1 of 1 failed" in proc.stdout
