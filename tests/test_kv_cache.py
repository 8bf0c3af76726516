"""The static KV cache: cached forwards equal full recomputation (dense and modality-sparse,
equal and ragged lengths, draft-tree masks), and the cache ops match plain indexing."""
import pytest
import torch

from mmfm.models import KVCache, ModelConfig, Transformer
from mmfm.ops import cache as cache_ops


def _model(sparse=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=50,
                      max_seq_len=64, modality_sparse=sparse, num_modalities=3 if sparse else 0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("sparse", [False, True])
def test_incremental_logits_equal_full_forward(sparse):
    m = _model(sparse)
    ids = torch.randint(0, 50, (3, 12))
    mod = torch.randint(0, 3, (3, 12)) if sparse else None
    with torch.no_grad():
        full = m(ids, mod)
        cache = KVCache.for_model(m, batch=3, capacity=20)
        parts = [m(ids[:, :5], None if mod is None else mod[:, :5], cache=cache)]
        for t in range(5, 12):
            parts.append(m(ids[:, t:t + 1], None if mod is None else mod[:, t:t + 1], cache=cache))
    got = torch.cat(parts, 1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [12, 12, 12]


def test_ragged_prefill_then_decode_matches_each_row_alone():
    m = _model()
    lens = [4, 7, 2]
    rows = [torch.randint(0, 50, (n + 3,)) for n in lens]   # prompt + 3 continuation tokens each
    padded = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lens):
        padded[b, :n] = rows[b][:n]
    with torch.no_grad():
        cache = KVCache.for_model(m, batch=3, capacity=16)
        pre = m(padded, cache=cache, counts=torch.tensor(lens))
        assert cache.lengths.tolist() == lens
        steps = [m(torch.stack([rows[b][lens[b] + s] for b in range(3)])[:, None], cache=cache) for s in range(3)]
        for b, n in enumerate(lens):
            alone = m(rows[b][None])[0]
            torch.testing.assert_close(pre[b, n - 1], alone[n - 1], rtol=1e-5, atol=1e-5)
            for s in range(3):
                torch.testing.assert_close(steps[s][b, 0], alone[n + s], rtol=1e-5, atol=1e-5)


def test_tree_mask_equals_each_branch_alone_and_keep_compacts():
    m = _model()
    prefix = torch.randint(0, 50, (1, 6))
    # tree: node0 root; node1 child of 0; node2 child of 0; node3 child of 2
    parent = [-1, 0, 0, 2]
    depth = [0, 1, 1, 2]
    toks = torch.randint(0, 50, (1, 4))
    anc = torch.zeros(1, 4, 4, dtype=torch.bool)
    for i in range(4):
        j = i
        while j >= 0:
            anc[0, i, j] = True
            j = parent[j]
    with torch.no_grad():
        cache = KVCache.for_model(m, batch=1, capacity=16)
        m(prefix, cache=cache)
        pos = 6 + torch.tensor(depth)[None]
        tree = m(toks, attn_mask=anc, positions=pos, cache=cache)
        for path in ([0, 1], [0, 2, 3]):
            seq = torch.cat([prefix, toks[:, path]], 1)
            alone = m(seq)[0, 6:]
            torch.testing.assert_close(tree[0, path], alone, rtol=1e-5, atol=1e-5)
        # accept path 0 -> 2 -> 3, compact, then decode one more token: equals the plain sequence
        cache.keep(0, 6, torch.tensor([0, 2, 3]))
        assert cache.lengths.tolist() == [9]
        nxt = torch.randint(0, 50, (1, 1))
        step = m(nxt, cache=cache)
        seq = torch.cat([prefix, toks[:, [0, 2, 3]], nxt], 1)
        torch.testing.assert_close(step[0, 0], m(seq)[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_keep_moves_only_the_named_row_and_slots(batch):
    """KVCache.keep against plain indexing: offsets as a list or a tensor, leading offsets already in
    place, a path along the first nodes (nothing moves), and with two rows the other row untouched."""
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=24, vocab_size=20, max_seq_len=32)
    for offsets, as_tensor in (([0, 1, 4, 6], False), ([0, 2, 3], True), ([0, 1, 2], False), ([0], True)):
        cache = KVCache.for_model(Transformer(cfg), batch=batch, capacity=16)
        cache.k.copy_(torch.randn_like(cache.k))
        cache.v.copy_(torch.randn_like(cache.v))
        cache.lengths.fill_(12)
        k0, v0 = cache.k.clone(), cache.v.clone()
        row, start = batch - 1, 5
        cache.keep(row, start, torch.tensor(offsets) if as_tensor else offsets)
        src = [start + o for o in offsets]
        want_k, want_v = k0.clone(), v0.clone()
        want_k[:, row, :, start:start + len(offsets)] = k0[:, row, :, src]
        want_v[:, row, :, start:start + len(offsets)] = v0[:, row, :, src]
        assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
        assert cache.lengths[row] == start + len(offsets)
        if batch == 2:
            assert cache.lengths[0] == 12


def test_truncate_then_redecode_and_reorder_rows():
    m = _model()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        cache = KVCache.for_model(m, batch=2, capacity=16)
        m(ids, cache=cache)
        cache.truncate(5)
        out = m(ids[:, 5:], cache=cache)
        torch.testing.assert_close(out, m(ids)[:, 5:], rtol=1e-5, atol=1e-5)
        cache.reorder_rows(torch.tensor([1, 1, 0]))
        nxt = torch.randint(0, 50, (3, 1))
        got = m(nxt, cache=cache)
        for b, src in enumerate([1, 1, 0]):
            ref = m(torch.cat([ids[src], nxt[b]])[None])[0, -1]
            torch.testing.assert_close(got[b, 0], ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(99)


def test_capacity_overflow_names_capacity():
    m = _model()
    cache = KVCache.for_model(m, batch=1, capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_cache_ops_against_plain_indexing():
    torch.manual_seed(0)
    B, H, T, D = 3, 2, 10, 4
    cache = torch.randn(B, H, T, D)
    new = torch.randn(B, H, 4, D)
    starts, counts = torch.tensor([0, 3, 6]), torch.tensor([4, 2, 4])
    ref = cache.clone()
    for b in range(B):
        ref[b, :, starts[b]:starts[b] + counts[b]] = new[b, :, :counts[b]]
    got = cache_ops.kv_append(cache.clone(), new, starts, counts)
    assert torch.equal(got, ref)
    lengths, at = torch.tensor([5, 2, 6]), torch.tensor([2, 2, 0])
    ent = torch.randn(B, H, 3, D)
    got = cache_ops.kv_insert(cache.clone(), lengths, at, ent)
    for b in range(B):
        a, n = int(at[b]), int(lengths[b])
        want = torch.cat([cache[b, :, :a], ent[b], cache[b, :, a:n]], 1)
        assert torch.equal(got[b, :, :n + 3], want)
    rows = torch.tensor([2, 0, 0, 1])
    assert torch.equal(cache_ops.kv_gather_rows(cache, rows), cache[rows])
    with pytest.raises(ValueError, match="capacity"):
        cache_ops.kv_append(cache.clone(), new, torch.tensor([8, 0, 0]))
    with pytest.raises(ValueError, match="rows"):
        cache_ops.kv_gather_rows(cache, torch.tensor([3]))
