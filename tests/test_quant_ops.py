"""Compiled quantization ops (torch.ops.mmfm.*) against their pure-torch references.

Exact equality for integer outputs (indices), allclose for distances and sums. Integer-valued
inputs make every dot product exact in fp32, so deliberate ties are real ties for both
implementations and the lowest-index rule is tested, not luck.
"""
import os
import subprocess
import sys

import pytest
import torch

from mmfm.ops import quant

pytestmark = pytest.mark.usefixtures("needs_extension")
OPS = torch.ops.mmfm


def integer_data(n, k, d, seed, dup_every=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-4, 5, (n, d), generator=g).float()
    e = torch.randint(-4, 5, (k, d), generator=g).float()
    if k > dup_every:
        e[dup_every::dup_every] = e[0]  # exact duplicates of code 0: ties everywhere code 0 wins
    return z, e


# ------------------------------------------------------------------ nearest_code
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (1, 7, 13), (37, 1, 5), (200, 33, 13), (513, 300, 64), (64, 17, 3)])
def test_nearest_code_exact_with_ties(n, k, d):
    z, e = integer_data(n, k, d, seed=n + k + d)
    idx, dist = OPS.nearest_code(z, e, 1, False)
    ref_idx, ref_dist = quant.nearest_code_reference(z, e)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)  # exact: integer arithmetic


def test_nearest_code_ties_pick_lowest_index():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    idx, _ = quant.nearest_code(z, e)
    assert idx.tolist() == [0, 1, 0]  # the third row is equidistant from all four codes
    idx, _ = quant.nearest_code(z, e, topk=4)
    assert idx[2].tolist() == [0, 1, 2, 3]
    assert idx[0].tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("k,d,topk", [(50, 16, 5), (300, 13, 17), (20, 7, 20)])
def test_nearest_code_topk_exact(k, d, topk):
    z, e = integer_data(150, k, d, seed=k)
    idx, dist = OPS.nearest_code(z, e, topk, False)
    ref_idx, ref_dist = quant.nearest_code_reference(z, e, topk)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())


def _agree_up_to_rounding(z, e, idx, cosine=False):
    """Indices equal the float64 argmin, except where two codes are within rounding."""
    zz, ee = z.double(), e.double()
    if cosine:
        zz, ee = torch.nn.functional.normalize(zz, dim=-1), torch.nn.functional.normalize(ee, dim=-1)
    d = torch.cdist(zz, ee) ** 2
    best = d.min(1).values
    chosen = d.gather(1, idx[:, None])[:, 0]
    assert bool(((chosen - best) <= 1e-4 * (1 + best)).all())
    return (idx == d.argmin(1)).float().mean().item()


@pytest.mark.parametrize("n,k,d", [(1000, 257, 32), (333, 1024, 8), (100, 64, 256), (16, 3000, 19)])
def test_nearest_code_random_float(n, k, d):
    g = torch.Generator().manual_seed(k)
    z, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx, dist = OPS.nearest_code(z, e, 1, False)
    assert _agree_up_to_rounding(z, e, idx[:, 0]) > 0.99
    ref_idx, ref_dist = quant.nearest_code_reference(z, e)
    torch.testing.assert_close(dist, ((z - e[idx[:, 0]]) ** 2).sum(-1, keepdim=True), rtol=1e-4, atol=1e-4)
    same = idx == ref_idx
    torch.testing.assert_close(dist[same], ref_dist[same], rtol=1e-4, atol=1e-4)


def test_nearest_code_cosine():
    g = torch.Generator().manual_seed(3)
    z, e = torch.randn(500, 24, generator=g) * 5, torch.randn(300, 24, generator=g) * 0.1
    idx, dist = quant.nearest_code(z, e, cosine=True)
    assert _agree_up_to_rounding(z, e, idx, cosine=True) > 0.99
    zn, en = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(e, dim=-1)
    torch.testing.assert_close(dist, 2 - 2 * (zn * en[idx]).sum(-1), rtol=1e-4, atol=1e-5)
    # cosine ignores scale: scaling a row does not change its code
    assert torch.equal(quant.nearest_code(z * 7.5, e, cosine=True)[0], idx)


def test_nearest_code_bf16_and_noncontiguous():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(64, 400, generator=g)[:, ::10]  # [64, 40], stride 10: not contiguous
    e = torch.randn(40, 300, generator=g).t()  # [300, 40] transposed view
    assert not z.is_contiguous() and not e.is_contiguous()
    idx, dist = quant.nearest_code(z, e)
    ref_idx, _ = quant.nearest_code_reference(z.contiguous(), e.contiguous())
    assert _agree_up_to_rounding(z, e, idx) > 0.98
    zb, eb = z.bfloat16(), e.bfloat16()
    idx_b, dist_b = quant.nearest_code(zb, eb)
    # bf16 inputs are compared in fp32: same as the fp32 op on the upcast values
    idx_f, dist_f = quant.nearest_code(zb.float(), eb.float())
    assert torch.equal(idx_b, idx_f)
    torch.testing.assert_close(dist_b, dist_f)
    assert dist_b.dtype == torch.float32 and idx_b.dtype == torch.int64


def test_nearest_code_leading_dims():
    z, e = integer_data(24, 10, 6, seed=9)
    idx, dist = quant.nearest_code(z.reshape(2, 3, 4, 6), e)
    assert idx.shape == (2, 3, 4) and dist.shape == (2, 3, 4)
    assert torch.equal(idx.reshape(-1), quant.nearest_code(z, e)[0])


def test_nearest_code_thread_count_does_not_change_result():
    g = torch.Generator().manual_seed(5)
    z, e = torch.randn(2000, 32, generator=g), torch.randn(700, 32, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = quant.nearest_code(z, e)
        torch.set_num_threads(2)
        b = quant.nearest_code(z, e)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ EMA statistics
def test_code_stats_matches_scatter_reference():
    g = torch.Generator().manual_seed(6)
    z = torch.randint(-50, 50, (3000, 20), generator=g).float()
    idx = torch.randint(0, 97, (3000,), generator=g)
    idx[idx == 5] = 6  # leave code 5 unused
    sums, counts = OPS.code_stats(z, idx, 97)
    ref_sums, ref_counts = quant.code_stats_reference(z, idx, 97)
    assert torch.equal(sums, ref_sums) and torch.equal(counts, ref_counts)
    assert counts[5] == 0 and bool((sums[5] == 0).all())


def test_code_stats_is_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(20000, 16, generator=g)
    idx = torch.randint(0, 33, (20000,), generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = quant.code_stats(z, idx, 33)
        torch.set_num_threads(2)
        b = quant.code_stats(z, idx, 33)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # sums in row order, as a float64-checked reference
    torch.testing.assert_close(a[0], quant.code_stats_reference(z.double(), idx, 33)[0].float(), rtol=1e-5, atol=1e-4)


def test_code_stats_bf16():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(500, 8, generator=g).bfloat16()
    idx = torch.randint(0, 10, (500,), generator=g)
    sums, counts = quant.code_stats(z, idx, 10)
    ref = quant.code_stats_reference(z.float(), idx, 10)
    torch.testing.assert_close(sums, ref[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, ref[1])


def test_ema_update_matches_reference_and_flags_dead_codes():
    g = torch.Generator().manual_seed(9)
    K, D = 50, 12
    size = torch.rand(K, generator=g) * 10
    size[[3, 17]] = 0.0
    esum = torch.randn(K, D, generator=g)
    counts = torch.randint(0, 20, (K,), generator=g).float()
    counts[[3, 17]] = 0.0
    sums = torch.randn(K, D, generator=g)
    got = OPS.ema_codebook_update(size, esum, counts, sums, 0.9, 1e-5, 0.5)
    ref = quant.ema_codebook_update_reference(size, esum, counts, sums, 0.9, 1e-5, 0.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[3][3] and got[3][17] and not got[3][0]


# ------------------------------------------------------------------ FSQ
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [7, 5, 5, 5, 5], [4, 4, 4, 2, 16]])
def test_fsq_matches_reference_and_round_trips(levels):
    g = torch.Generator().manual_seed(len(levels))
    z = torch.randn(4000, len(levels), generator=g) * 3
    lv = quant.as_levels(levels)
    codes, idx = OPS.fsq_quantize(z, lv)
    ref_codes, ref_idx = quant.fsq_quantize_reference(z, lv)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(codes, ref_codes)
    # every level is reachable and the implicit codebook is covered densely
    size = int(torch.prod(lv))
    assert int(idx.min()) >= 0 and int(idx.max()) < size
    for c, L in enumerate(levels):
        assert codes[:, c].unique().numel() == L
    assert torch.equal(quant.fsq_indices_to_codes(idx, levels), codes)
    assert torch.equal(quant.fsq_codes_to_indices(codes, levels), idx)
    all_idx = torch.arange(size)
    assert torch.equal(quant.fsq_codes_to_indices(quant.fsq_indices_to_codes(all_idx, levels), levels), all_idx)
    assert torch.equal(quant.fsq_indices_to_codes(all_idx, levels), quant.fsq_indices_to_codes_reference(all_idx, lv))


def test_fsq_straight_through_gradient():
    levels = [8, 5, 4]
    lv = quant.as_levels(levels)
    z = torch.randn(300, 3, dtype=torch.float32, requires_grad=True)
    codes, _ = quant.fsq_quantize(z, levels)
    w = torch.randn_like(codes)
    (codes * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (quant.fsq_bound_reference(z2, lv) / (lv // 2) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-6)
    assert bool((z.grad != 0).any())


def test_fsq_bf16_input():
    z = torch.randn(100, 4).bfloat16()
    codes, idx = quant.fsq_quantize(z, [8, 5, 5, 5])
    assert codes.dtype == torch.bfloat16
    assert torch.equal(idx, quant.fsq_quantize(z.float(), [8, 5, 5, 5])[1])


# ------------------------------------------------------------------ LFQ
def test_lfq_quantize_and_packing():
    g = torch.Generator().manual_seed(10)
    for d in (1, 7, 16, 40, 62):
        z = torch.randn(257, d, generator=g)
        z[0] = 0.0  # zero maps to -1 (bit 0)
        codes, idx = OPS.lfq_quantize(z)
        ref_codes, ref_idx = quant.lfq_quantize_reference(z)
        assert torch.equal(codes, ref_codes) and torch.equal(idx, ref_idx)
        assert idx[0] == 0 and bool((codes[0] == -1).all())
        assert torch.equal(quant.lfq_indices_to_codes(idx, d), codes)
        assert int(idx.min()) >= 0


def test_lfq_straight_through():
    z = torch.randn(10, 6, requires_grad=True)
    codes, _ = quant.lfq_quantize(z)
    codes.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


@pytest.mark.parametrize("d,exact,tau", [(1, True, 1.0), (6, True, 0.5), (10, True, 1.0), (16, True, 2.0),
                                         (24, False, 1.0), (8, False, 0.3)])
def test_lfq_entropy_forward_and_gradient(d, exact, tau):
    g = torch.Generator().manual_seed(d)
    n = 64 if d == 16 else 300
    z = torch.randn(n, d, generator=g) * 0.7
    zc = z.clone().requires_grad_(True)
    sample, codebook = quant.lfq_entropy(zc, tau, exact)
    zr = z.clone().requires_grad_(True)
    ref = quant.lfq_entropy_reference(zr, tau, exact)
    torch.testing.assert_close(torch.stack([sample, codebook]).detach(), ref.detach(), rtol=2e-4, atol=2e-4)
    (1.5 * sample - 0.7 * codebook).backward()
    (1.5 * ref[0] - 0.7 * ref[1]).backward()
    torch.testing.assert_close(zc.grad, zr.grad, rtol=2e-3, atol=2e-5)


def test_lfq_entropy_bounds():
    # confident, evenly used codes: sample entropy ~ 0, codebook entropy ~ d log 2
    d = 4
    codes = quant.lfq_indices_to_codes(torch.arange(16).repeat(8), d) * 20
    sample, codebook = quant.lfq_entropy(codes, 1.0, True)
    assert float(sample) < 1e-3
    assert abs(float(codebook) - d * torch.log(torch.tensor(2.0)).item()) < 1e-3
    # one code for everything: codebook entropy ~ 0
    _, collapsed = quant.lfq_entropy(torch.full((32, d), 20.0), 1.0, True)
    assert float(collapsed) < 1e-3


# ------------------------------------------------------------------ residual VQ
@pytest.mark.parametrize("m,k,d", [(1, 1, 3), (4, 64, 16), (8, 100, 13)])
def test_residual_vq_matches_reference(m, k, d):
    g = torch.Generator().manual_seed(m * k)
    z = torch.randint(-8, 9, (300, d), generator=g).float()
    cbs = torch.randint(-4, 5, (m, k, d), generator=g).float()
    idx, q, norms = OPS.residual_vq(z, cbs)
    ref_idx, ref_q, ref_norms = quant.residual_vq_reference(z, cbs)
    assert torch.equal(idx, ref_idx) and torch.equal(q, ref_q) and torch.equal(norms, ref_norms)


def test_residual_vq_residual_shrinks_on_random_data():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2000, 16, generator=g)
    scales = torch.tensor([1.0, 0.5, 0.25, 0.12])[:, None, None]
    cbs = torch.randn(4, 256, 16, generator=g) * scales
    idx, q, norms = quant.residual_vq(z, cbs)
    assert bool((norms[:, 1:] <= norms[:, :-1] + 1e-5).float().mean() > 0.95)
    torch.testing.assert_close(norms[:, -1], ((z - q) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    ref_idx, ref_q, _ = quant.residual_vq_reference(z, cbs)
    assert (idx == ref_idx).all(1).float().mean() > 0.99
    bidx, bq, _ = quant.residual_vq(z.bfloat16(), cbs.bfloat16())
    assert torch.equal(bidx, quant.residual_vq(z.bfloat16().float(), cbs.bfloat16().float())[0])


# ------------------------------------------------------------------ bad input
BAD_CASES = [
    (lambda: quant.nearest_code(torch.randn(4, 3).double(), torch.randn(5, 3).double()), TypeError, "'z'"),
    (lambda: quant.nearest_code(torch.randint(0, 3, (4, 3)), torch.randn(5, 3)), TypeError, "'z'"),
    (lambda: quant.nearest_code(torch.randn(4, 3), torch.randn(5, 4)), ValueError, "'codebook'"),
    (lambda: quant.nearest_code(torch.randn(0, 3), torch.randn(5, 3)), ValueError, "'z' is empty"),
    (lambda: quant.nearest_code(torch.randn(4, 3), torch.randn(0, 3)), ValueError, "'codebook' is empty"),
    (lambda: quant.nearest_code(torch.tensor([[0.0, float("nan")]]), torch.randn(5, 2)), ValueError, "'z' contains NaN"),
    (lambda: quant.nearest_code(torch.randn(2, 2), torch.tensor([[float("inf"), 0.0]])), ValueError, "'codebook' contains NaN"),
    (lambda: quant.nearest_code(torch.randn(2, 2), torch.randn(5, 2), topk=6), ValueError, "'topk'"),
    (lambda: quant.code_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 9]), 5), ValueError, "'indices'"),
    (lambda: quant.fsq_quantize(torch.randn(4, 3), [8, 1, 5]), ValueError, "'levels'"),
    (lambda: quant.fsq_quantize(torch.randn(4, 3), [8, 5]), ValueError, "'z'"),
    (lambda: quant.fsq_quantize(torch.randn(4, 0), []), ValueError, "'levels'"),
    (lambda: quant.fsq_indices_to_codes(torch.tensor([40]), [8, 5]), ValueError, "'indices'"),
    (lambda: quant.lfq_quantize(torch.randn(4, 63)), ValueError, "'z'"),
    (lambda: quant.lfq_entropy(torch.randn(4, 20), exact=True), ValueError, "'exact'"),
    (lambda: quant.lfq_entropy(torch.randn(4, 3), temperature=0.0), ValueError, "'temperature'"),
    (lambda: quant.residual_vq(torch.randn(4, 3), torch.randn(2, 5, 4)), ValueError, "'codebooks'"),
    (lambda: quant.ema_codebook_update(torch.ones(3), torch.ones(3, 2), torch.ones(3), torch.ones(3, 2), 1.5), ValueError, "'decay'"),
]


@pytest.mark.parametrize("call,exc,message", BAD_CASES)
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# The compiled ops check arguments themselves too, for callers of torch.ops.mmfm.* directly.
RAW_BAD_CASES = [
    (lambda: OPS.nearest_code(torch.randn(4, 3).double(), torch.randn(5, 3).double(), 1, False), TypeError, "'z'"),
    (lambda: OPS.nearest_code(torch.randn(4, 3), torch.randn(5, 4), 1, False), ValueError, "'codebook'"),
    (lambda: OPS.nearest_code(torch.randn(4, 3), torch.randn(0, 3), 1, False), ValueError, "'codebook' is empty"),
    (lambda: OPS.nearest_code(torch.tensor([[float("nan")]]), torch.randn(5, 1), 1, False), ValueError, "NaN"),
    (lambda: OPS.nearest_code(torch.tensor([[float("inf")]]).bfloat16(), torch.randn(5, 1).bfloat16(), 1, False),
     ValueError, "'z' contains NaN or inf"),
    (lambda: OPS.code_stats(torch.cat([torch.randn(70000, 2), torch.tensor([[0.0, float("nan")]])]),
                            torch.zeros(70001, dtype=torch.long), 1), ValueError, "'z' contains NaN or inf"),
    (lambda: OPS.fsq_quantize(torch.randn(4, 2), torch.tensor([8, 1])), ValueError, "'levels'"),
    (lambda: OPS.code_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, -1]), 5), ValueError, "'indices'"),
    (lambda: OPS.lfq_entropy(torch.randn(4, 17), 1.0, True), ValueError, "'exact'"),
    (lambda: OPS.residual_vq(torch.randn(4, 3), torch.randn(5, 3), ), ValueError, "'codebooks'"),
]


@pytest.mark.parametrize("call,exc,message", RAW_BAD_CASES)
def test_compiled_op_checks_arguments(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# ------------------------------------------------------------------ fallback without the extension
def test_reference_fallback_without_extension_warns_once(tmp_path):
    script = tmp_path / "fallback.py"
    script.write_text(
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import mmfm\n"
        "from mmfm.ops import quant\n"
        "assert not mmfm.ops.extension_loaded()\n"
        "z = torch.randint(-3, 4, (50, 6)).float(); e = torch.randint(-3, 4, (20, 6)).float()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = quant.nearest_code(z, e)[0]; b = quant.nearest_code(z, e)[0]\n"
        "    c = quant.fsq_quantize(torch.randn(5, 3), [8, 5, 5])[1]\n"
        "msgs = [str(x.message) for x in w if 'mmfm._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'pip install --no-build-isolation -e .' in msgs[0]\n"
        "assert torch.equal(a, quant.nearest_code_reference(z, e)[0][:, 0])\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MMFM_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
