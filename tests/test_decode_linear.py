"""decode_linear (csrc/linear, mmfm/ops/linear.py): y = residual + s * (x @ W) for the few rows of a
decode step or a draft tree, on W packed in 16-column panels. The compiled op (its AVX2 micro-kernel
and its portable loop) against the pure-torch reference over row counts that hit every block split
(1..6, 7, 12, 13, 20, 33), widths that are and are not multiples of 16, with and without the RMS
factor and the residual, at 1 and 2 threads; packing round-trips; every bad argument is named;
DenseStep uses the packed op on CPU float32 and falls back to torch with one warning without the
extension."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

from mmfm.ops import linear as L

ops = torch.ops.mmfm


@pytest.fixture(autouse=True)
def _compiled(needs_extension):
    """Every test here checks the compiled op (the fallback has its own subprocess test)."""


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def want(x, w, rms_add, residual):
    y = x.double() @ w.double()
    if rms_add is not None:
        y = y * torch.rsqrt((x.double() ** 2).sum(-1, keepdim=True) + rms_add)
    return (y if residual is None else y + residual.double()).float()


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(192, 1024), (7, 33), (1, 16), (64, 17), (512, 192)])
def test_op_matches_reference_for_every_row_split(n_in, n_out, generic):
    w = rnd(n_in, n_out, seed=1)
    p = L.pack_panels(w)
    for n in (1, 2, 3, 4, 5, 6, 7, 12, 13, 20, 33):
        x = rnd(n, n_in, seed=n)
        for rms_add, residual in ((None, None), (0.5, None), (None, rnd(n, n_out, seed=99)), (1e-3, rnd(n, n_out))):
            got = ops.decode_linear(x, p, n_out, rms_add, residual, generic)
            ref = want(x, w, rms_add, residual)
            torch.testing.assert_close(got, ref, atol=2e-5 * float(ref.abs().max()) + 1e-6, rtol=1e-5,
                                       msg=f"n={n} rms={rms_add} residual={residual is not None}")
            # and the torch reference the step falls back to agrees with both
            ref_t = L.decode_linear_reference(x, w, rms_add, residual)
            torch.testing.assert_close(ref_t, ref, atol=2e-5 * float(ref.abs().max()) + 1e-6, rtol=1e-5)


def test_strided_inputs_and_threads_give_the_same_result():
    w = rnd(96, 700, seed=3)
    p = L.pack_panels(w)
    x = rnd(40, 96 * 2, seed=4)[:9, ::2]             # non-contiguous rows
    res = rnd(700, 9, seed=5).t()                     # transposed residual
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_linear(x, p, 700, 0.1, res, False)
        torch.set_num_threads(2)
        two = ops.decode_linear(x, p, 700, 0.1, res, False)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)                     # panels split across threads: same sums, same order
    torch.testing.assert_close(one, want(x, w, 0.1, res), atol=1e-4, rtol=1e-5)


def test_pack_round_trips_and_pads_with_zeros():
    w = rnd(5, 37, seed=6)
    p = L.pack_panels(w)
    assert p.shape == (3, 5, 16) and p.is_contiguous()
    assert torch.equal(L.unpack_panels(p, 37), w)
    assert torch.equal(p[2, :, 5:], torch.zeros(5, 11))
    assert torch.equal(p[1, 3], w[3, 16:32])


def test_pack_linear_packs_cpu_float32_and_keeps_torch_elsewhere():
    w = rnd(8, 20)
    assert L.pack_linear(w).packed is not None and L.pack_linear(w).weight is None
    b = L.pack_linear(w.bfloat16())
    assert b.packed is None and b.weight.dtype == torch.bfloat16 and b.weight.is_contiguous()
    view = rnd(20, 8).t()                                # F.linear's storage seen as [in, out]
    assert torch.equal(L.unpack_panels(L.pack_linear(view).packed, 20), view)
    x = rnd(3, 8)
    torch.testing.assert_close(L.decode_linear(x, L.pack_linear(w), 0.2), L.decode_linear_reference(x, w, 0.2))
    torch.testing.assert_close(L.decode_linear(x.bfloat16(), b, 0.2).float(),
                               L.decode_linear_reference(x, w, 0.2), atol=0.05, rtol=0.02)


def test_bad_arguments_are_named():
    w = rnd(8, 20)
    p = L.pack_panels(w)
    x = rnd(3, 8)
    with pytest.raises(TypeError, match="argument 'x' must be float32"):
        ops.decode_linear(x.double(), p, 20, None, None, False)
    with pytest.raises(ValueError, match=r"argument 'packed' must have shape \[2, 8, 16\] for out_features=20"):
        ops.decode_linear(x, p[:1], 20, None, None, False)
    with pytest.raises(ValueError, match=r"argument 'packed' must have shape \[2, 9, 16\]"):
        ops.decode_linear(rnd(3, 9), p, 20, None, None, False)
    with pytest.raises(ValueError, match=r"argument 'residual' must have shape \[3, 20\]"):
        ops.decode_linear(x, p, 20, None, rnd(3, 19), False)
    with pytest.raises(ValueError, match="argument 'rms_add' must be >= 0"):
        ops.decode_linear(x, p, 20, -1.0, None, False)
    with pytest.raises(ValueError, match="argument 'x' must have shape"):
        ops.decode_linear(x[0], p, 20, None, None, False)
    with pytest.raises(ValueError, match="argument 'out_features' must be positive"):
        ops.decode_linear(x, p, 0, None, None, False)
    with pytest.raises(ValueError, match="argument 'weight' must be a 2-d tensor"):
        L.pack_linear(rnd(2, 3, 4))


def test_the_build_compiled_a_micro_kernel():
    isa = L.decode_linear_isa()
    assert isa in ("avx2-fma x12", "avx2-fma x6", "generic"), isa
    if "avx2" in open("/proc/cpuinfo").read() and os.environ.get("MMFM_CPU_ARCH", "native") == "native":
        assert isa.startswith("avx2"), isa   # a -march=native build on an AVX2 machine must use it


def test_dense_step_runs_the_packed_op_on_cpu_float32():
    """The decode loop's step packs its weights and gives Transformer.forward's logits; a step
    that silently fell back to torch would pass the logit checks elsewhere but fail here."""
    from mmfm.bench.common import mmfm_ops_run
    from mmfm.generate.step import DenseStep
    from mmfm.models.config import ModelConfig
    from mmfm.models.kv_cache import KVCache
    from mmfm.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=40, vocab_size=50,
                                    max_seq_len=64)).eval()
    step = DenseStep(model, 16)
    assert all(w.packed is not None for ws in step.layers for w in ws) and step.head.packed is not None
    cache = KVCache.for_model(model, batch=1, capacity=16)
    ids = torch.tensor([[3, 7, 9]])
    with torch.no_grad():
        model(ids[:, :2], cache=cache)
        out = {}
        ran = mmfm_ops_run(lambda: out.setdefault("logits", step(ids[0, 2:], cache, 3, False)))
        full = model(ids)[0, -1]
    assert "mmfm::decode_linear" in ran
    torch.testing.assert_close(out["logits"][0], full, atol=1e-4, rtol=1e-4)


def test_fallback_without_extension_runs_torch_with_one_warning(run_without_extension):
    script = textwrap.dedent("""
        import warnings
        import torch
        from mmfm import _ext
        from mmfm.ops import linear as L
        assert not _ext.extension_loaded(), _ext.load_error()
        w = torch.randn(8, 20); x = torch.randn(3, 8); r = torch.randn(3, 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = L.pack_linear(w.t().contiguous().t())
            p2 = L.pack_linear(w)
            got = L.decode_linear(x, p, 0.3, r)
        msgs = [str(m.message) for m in caught if issubclass(m.category, RuntimeWarning)]
        assert len(msgs) == 1 and "pure-torch reference" in msgs[0], msgs
        assert p.packed is None and p.weight.is_contiguous() and p2.packed is None
        want = r + (x @ w) * torch.rsqrt((x * x).sum(-1, keepdim=True) + 0.3)
        torch.testing.assert_close(got, want)
        print("fallback ok")
    """)
    proc = run_without_extension(script)
    assert proc.returncode == 0, proc.stdout
    assert "fallback ok" in proc.stdout
