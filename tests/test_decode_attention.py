"""decode_attention (csrc/attention, mmfm/ops/attention.py): the few new queries of a decode step or
a draft tree against a cache layer, against torch's scaled_dot_product_attention with the
equivalent mask, over ragged prefixes, causal blocks and tree masks, grouped-query heads, head sizes
the vectorised kernel takes and ones it leaves to the portable loop, strided queries, 1 and 2
threads; every bad argument is named; DenseStep attends through it on CPU float32."""
from __future__ import annotations

import pytest
import torch

from mmfm.ops import attention as A

ops = torch.ops.mmfm


@pytest.fixture(autouse=True)
def _compiled(needs_extension):
    """Every test here checks the compiled op."""


def case(B, n, H, Hkv, hd, T, seed, tree=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, hd, generator=g)
    k, v = torch.randn(B, Hkv, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    prefix = torch.randint(0, T - n + 1, (B,), generator=g)
    mask = ((torch.rand(n, n, generator=g) < 0.4) | torch.eye(n, dtype=torch.bool)) if tree else None
    return q, k, v, prefix, mask


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("B,n,H,Hkv,hd,T", [(1, 1, 6, 2, 32, 300), (4, 1, 4, 2, 32, 50), (1, 9, 6, 2, 32, 120),
                                            (2, 5, 8, 8, 64, 40), (1, 20, 4, 1, 16, 33), (2, 3, 2, 1, 12, 9),
                                            (3, 2, 3, 3, 8, 17)])
def test_op_matches_sdpa(B, n, H, Hkv, hd, T, generic):
    for seed in range(3):
        for tree in (False, True):
            q, k, v, prefix, mask = case(B, n, H, Hkv, hd, T, seed, tree)
            got = ops.decode_attention(q, k, v, prefix, mask, generic)
            want = A.decode_attention_reference(q.double(), k.double(), v.double(), prefix, mask).float()
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"seed {seed} tree {tree}")


def test_prefix_zero_and_full_cache():
    q, k, v, _, mask = case(2, 4, 4, 2, 32, 4, 0)
    got = ops.decode_attention(q, k, v, torch.tensor([0, 0]), mask, False)          # only the new keys
    torch.testing.assert_close(got, A.decode_attention_reference(q, k, v, torch.tensor([0, 0]), mask))
    q1, k1, v1, _, _ = case(1, 1, 2, 1, 32, 64, 1)
    got = ops.decode_attention(q1, k1, v1, torch.tensor([63]), None, False)       # the last slot
    torch.testing.assert_close(got, A.decode_attention_reference(q1, k1, v1, torch.tensor([63])))


def test_keys_outside_the_visible_set_do_not_matter():
    q, k, v, prefix, mask = case(2, 5, 4, 2, 32, 60, 3)
    before = ops.decode_attention(q, k, v, prefix, mask, False)
    k2, v2 = k.clone(), v.clone()
    for b in range(2):
        p = int(prefix[b])
        k2[b, :, p + 5:] = 1e4                     # slots after the new block: never visible
        v2[b, :, p + 5:] = float("nan")
    assert torch.equal(ops.decode_attention(q, k2, v2, prefix, mask, False), before)
    j = int((~mask).nonzero()[0, 1])               # a new key some query must not see
    for b in range(2):                             # changes only the queries that see key j
        k2[b, :, int(prefix[b]) + j] = 0
    after = ops.decode_attention(q, k2, v2, prefix, mask, False)
    blind = ~mask[:, j]
    assert torch.equal(after[:, blind], before[:, blind]) and not torch.equal(after, before)


def test_strided_queries_and_threads():
    g = torch.Generator().manual_seed(5)
    qk = torch.randn(3, 6 + 2, 32, generator=g)                 # DenseStep's [B, H + Hkv, hd]
    q = qk.narrow(1, 0, 6).unsqueeze(1)                         # [B, 1, H, hd], not contiguous
    k, v = torch.randn(3, 2, 700, 32, generator=g), torch.randn(3, 2, 700, 32, generator=g)
    prefix = torch.tensor([650, 12, 399])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_attention(q, k, v, prefix, None, False)
        torch.set_num_threads(2)
        two = ops.decode_attention(q, k, v, prefix, None, False)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, A.decode_attention_reference(q.contiguous(), k, v, prefix), atol=2e-6, rtol=1e-5)


def test_bad_arguments_are_named():
    q, k, v, prefix, mask = case(2, 3, 4, 2, 32, 20, 0)
    with pytest.raises(TypeError, match="argument 'q' must be float32"):
        ops.decode_attention(q.double(), k, v, prefix, mask, False)
    with pytest.raises(ValueError, match="argument 'v' must have the shape of 'k'"):
        ops.decode_attention(q, k, v[:, :1], prefix, mask, False)
    with pytest.raises(ValueError, match="must be a multiple of k's Hkv=3"):
        ops.decode_attention(q, torch.randn(2, 3, 20, 32), torch.randn(2, 3, 20, 32), prefix, mask, False)
    with pytest.raises(ValueError, match=r"argument 'prefix' row 1: 18 \+ n=3 new keys must lie in the cache's T=20"):
        ops.decode_attention(q, k, v, torch.tensor([0, 18]), mask, False)
    with pytest.raises(TypeError, match="argument 'prefix' must be a CPU int64 tensor"):
        ops.decode_attention(q, k, v, prefix.int(), mask, False)
    with pytest.raises(ValueError, match=r"argument 'mask' row 1 must let query 1 see its own key"):
        ops.decode_attention(q, k, v, prefix, torch.zeros(3, 3, dtype=torch.bool).fill_diagonal_(True).index_fill_(
            0, torch.tensor([1]), False), False)
    with pytest.raises(ValueError, match=r"argument 'mask' must have shape \[n=3, n=3\]"):
        ops.decode_attention(q, k, v, prefix, mask[:2], False)
    with pytest.raises(ValueError, match="arguments 'k' and 'v' must be contiguous"):
        ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, prefix, mask, False)


def test_dense_step_attends_through_the_op():
    from mmfm.bench.common import mmfm_ops_run
    from mmfm.generate.step import DenseStep
    from mmfm.models.config import ModelConfig
    from mmfm.models.kv_cache import KVCache
    from mmfm.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=40, vocab_size=50,
                                    max_seq_len=64)).eval()
    step = DenseStep(model, 16)
    assert step.attn_op is not None
    cache = KVCache.for_model(model, batch=1, capacity=16)
    with torch.no_grad():
        model(torch.tensor([[3, 7]]), cache=cache)
        ran = mmfm_ops_run(lambda: step(torch.tensor([9]), cache, 3, False))
    assert "mmfm::decode_attention" in ran


def test_the_compiled_kernel_is_chosen_only_where_it_beats_sdpa():
    """DenseStep attends through the op only where its vectorised kernel runs; a head size the
    kernel has no template for, another dtype or device, keep SDPA (the portable loop is slower)."""
    assert A.compiled_op_for("cpu", torch.float32, 32) is not None
    assert A.compiled_op_for("cpu", torch.float32, 40) is None
    assert A.compiled_op_for("cpu", torch.bfloat16, 32) is None
    assert A.compiled_op_for("cuda", torch.float32, 32) is None
