"""Masked parallel decoding: the cosine schedule, MaskGIT and ReCAP mechanics (a cheap step right
after a full pass reproduces it; ReCAP with every step full is MaskGIT), and on a tiny model
trained with bidirectional masked prediction, iterative decoding produces the learned structure
that one-shot parallel decoding cannot."""
import math

import pytest
import torch

from mmfm.generate.masked import (cascade_decode, cheap_pass, full_pass, hybrid_mask, maskgit_decode, masked_after,
                                  recap_decode)
from mmfm.models import KVCache, ModelConfig, Transformer

V, MASK = 24, 3          # ids 0..3 play the specials (<mask> = 3); 4..23 are "image" tokens
LO, HI = 4, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine its spin-waits cost
    more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0, std=0.02, vocab=V):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab,
                      max_seq_len=64, init_std=std)
    return Transformer(cfg).eval()


def test_cosine_schedule():
    for length, steps in ((16, 8), (5, 5), (100, 12), (7, 1)):
        left = [masked_after(t, steps, length) for t in range(steps)]
        assert left[-1] == 0
        assert all(b < a for a, b in zip([length] + left, left))               # progress every step
        for t in range(steps - 1):
            assert left[t] <= math.ceil(length * math.cos(math.pi / 2 * (t + 1) / steps))


def test_maskgit_fills_every_position_in_range_and_repeats_with_seed():
    m = _model(std=0.3)
    kw = dict(mask_id=MASK, steps=6, allowed_range=(LO, HI), seed=5, suffix_ids=[2])
    out, stats = maskgit_decode(m, [[1, 0], [1, 1]], 12, **kw)
    assert out.shape == (2, 12) and int(out.min()) >= LO and int(out.max()) < HI
    assert stats.full_passes == 6 and stats.cheap_passes == 0 and stats.token_evals == 6 * 2 * 15
    assert torch.equal(out, maskgit_decode(m, [[1, 0], [1, 1]], 12, **kw)[0])
    out, stats = recap_decode(m, [[1, 0], [1, 1]], 12, full_every=3, **{**kw, "steps": 9})
    assert int(out.min()) >= LO and int(out.max()) < HI
    assert (stats.full_passes, stats.cheap_passes) == (3, 6)
    assert stats.token_evals < 9 * 2 * 15


@torch.no_grad()
def test_cheap_pass_right_after_full_pass_reproduces_it():
    m = _model(std=0.3)
    P, n = 3, 10
    seq = torch.randint(LO, HI, (2, P + n + 1))
    masked = torch.zeros(2, n, dtype=torch.bool)
    masked[0, [1, 4, 5, 8]] = True
    masked[1, [0, 2, 3, 9]] = True
    block = torch.where(masked, torch.full_like(masked, MASK, dtype=torch.long), seq[:, P:P + n])
    seq[:, P:P + n] = block
    cache = KVCache.for_model(m, batch=2, capacity=seq.shape[1])
    logits, active, n_ctx = full_pass(m, seq, masked, P, cache)
    want = m(seq, attn_mask=torch.ones(2, seq.shape[1], seq.shape[1], dtype=torch.bool))[:, P:P + n]
    assert torch.equal(active.sort(1).values, masked.nonzero()[:, 1].view(2, 4))
    torch.testing.assert_close(logits, want.gather(1, active[:, :, None].expand(-1, -1, V)), rtol=1e-4, atol=1e-5)
    again = cheap_pass(m, block, active, P, cache, n_ctx)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [n_ctx, n_ctx]


def test_recap_with_every_step_full_is_maskgit():
    m = _model(std=0.3)
    kw = dict(mask_id=MASK, steps=5, allowed_range=(LO, HI), temperature=0, choice_temperature=0.0)
    a, _ = maskgit_decode(m, [1, 0], 10, **kw)
    b, stats = recap_decode(m, [1, 0], 10, full_every=1, **kw)
    assert torch.equal(a, b) and stats.cheap_passes == 0


def test_bad_arguments_name_the_argument():
    m = _model()
    with pytest.raises(ValueError, match="steps"):
        maskgit_decode(m, [1], 4, mask_id=MASK, steps=5)
    with pytest.raises(ValueError, match="mask_id"):
        maskgit_decode(m, [1], 4, mask_id=V, steps=2)
    with pytest.raises(ValueError, match="length"):
        maskgit_decode(m, [1], 100, mask_id=MASK, steps=2)
    with pytest.raises(ValueError, match="full_every"):
        recap_decode(m, [1], 4, mask_id=MASK, steps=2, full_every=0)


# ----------------------------------------------------------------- a tiny trained masked model
N = 8   # block length; a block is one token repeated N times, so its positions depend on each other


def _constant_batch(B, g):
    c = torch.randint(LO, HI, (B, 1), generator=g)
    return torch.cat([torch.ones(B, 1, dtype=torch.long), c.expand(B, N)], 1)   # <bos>=1, then the block


def _consistent(block: torch.Tensor) -> torch.Tensor:
    return (block == block[:, :1]).all(1)


@pytest.fixture(scope="module")
def trained():
    """Masked prediction with bidirectional attention (the masked objective's setting), a
    hundred steps of plain Adam on constant blocks."""
    torch.manual_seed(0)
    m = _model(seed=0).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    L = N + 1
    full = torch.ones(64, L, L, dtype=torch.bool)
    for _ in range(100):
        x = _constant_batch(64, g)
        ratio = torch.rand(64, 1, generator=g).clamp(0.1, 1.0)
        hide = (torch.rand(64, L, generator=g) < ratio) & (torch.arange(L) > 0)
        inp = torch.where(hide, torch.full_like(x, MASK), x)
        logits = m(inp, attn_mask=full)
        loss = torch.nn.functional.cross_entropy(logits[hide], x[hide])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_iterative_decoding_beats_one_shot_on_a_trained_model(trained):
    kw = dict(mask_id=MASK, allowed_range=(LO, HI), seed=1, choice_temperature=1.0)
    prefix = torch.ones(200, 1, dtype=torch.long)
    one_shot = _consistent(maskgit_decode(trained, prefix, N, steps=1, **kw)[0]).float().mean()
    iterative = _consistent(maskgit_decode(trained, prefix, N, steps=8, **kw)[0]).float().mean()
    recap, stats = recap_decode(trained, prefix, N, steps=8, full_every=2, **kw)
    recap = _consistent(recap).float().mean()
    assert stats.full_passes == 4
    # one shot samples the 8 marginals independently (each about uniform over 20 tokens)
    assert one_shot < 0.1
    assert iterative > 0.9 and recap > 0.85, (float(iterative), float(recap))


def test_editing_everything_is_plain_decoding_and_kept_tokens_stay():
    m = _model(std=0.3)
    kw = dict(mask_id=MASK, steps=5, allowed_range=(LO, HI), seed=2, suffix_ids=[2])
    prefix = [[1, 0], [1, 1]]
    plain = maskgit_decode(m, prefix, 10, **kw)[0]
    given = torch.randint(LO, HI, (2, 10), generator=torch.Generator().manual_seed(0))
    everything = torch.ones(2, 10, dtype=torch.bool)
    assert torch.equal(maskgit_decode(m, prefix, 10, block_ids=given, edit_mask=everything, **kw)[0], plain)
    assert torch.equal(recap_decode(m, prefix, 10, full_every=2, block_ids=given, edit_mask=everything, **kw)[0],
                       recap_decode(m, prefix, 10, full_every=2, **kw)[0])
    where = torch.zeros(2, 10, dtype=torch.bool)
    where[0, [1, 4, 5, 9]] = True
    where[1, [0, 2, 3, 8]] = True
    for out, st in (maskgit_decode(m, prefix, 10, block_ids=given, edit_mask=where, **{**kw, "steps": 4}),
                    recap_decode(m, prefix, 10, full_every=2, block_ids=given, edit_mask=where, **{**kw, "steps": 4})):
        assert torch.equal(out[~where], given[~where])               # kept tokens are untouched
        assert int(out[where].min()) >= LO and int(out[where].max()) < HI
    with pytest.raises(ValueError, match="edit_mask"):
        bad = where.clone()
        bad[1, 9] = True
        maskgit_decode(m, prefix, 10, block_ids=given, edit_mask=bad, **kw)
    with pytest.raises(ValueError, match="steps"):
        maskgit_decode(m, prefix, 10, block_ids=given, edit_mask=where, **{**kw, "steps": 5})


def test_editing_repairs_a_corrupted_block_on_a_trained_model(trained):
    """Blocks of one constant token with 3 of N positions replaced by other tokens: regenerating
    those positions (the rest kept as context) restores the constant nearly always, where free
    decoding of the 3 (the uniform marginals the model has without context) would almost never."""
    g = torch.Generator().manual_seed(3)
    x = _constant_batch(200, g)
    block = x[:, 1:].clone()
    bad = torch.zeros_like(block, dtype=torch.bool)
    bad.scatter_(1, torch.rand(200, N, generator=g).argsort(1)[:, :3], True)
    noise = (block + torch.randint(1, HI - LO, block.shape, generator=g) - LO) % (HI - LO) + LO
    corrupt = torch.where(bad, noise, block)
    kw = dict(mask_id=MASK, allowed_range=(LO, HI), seed=1, choice_temperature=1.0, steps=3)
    fixed = maskgit_decode(trained, x[:, :1], N, block_ids=corrupt, edit_mask=bad, **kw)[0]
    assert not _consistent(corrupt).any()
    assert _consistent(fixed).float().mean() > 0.9
    assert torch.equal(fixed[~bad], corrupt[~bad])


def test_hybrid_mask_is_the_hybrid_objectives_attention():
    from mmfm.objectives import ObjectiveConfig, build_objective
    from mmfm.vocab import Vocab

    vocab = Vocab(16, {"image": 8})
    ids = torch.randint(0, 16, (6, 20), generator=torch.Generator().manual_seed(0))
    p = build_objective(ObjectiveConfig(kind="hybrid"), vocab).prepare(
        ids, vocab.modality_table()[ids], torch.ones(6, 20, dtype=torch.bool), torch.Generator().manual_seed(1))
    for b in range(6):
        s = int(p.attn_mask[b, :, -1].nonzero()[0])     # the first position that sees the last one
        assert torch.equal(hybrid_mask(s, 20)[0], p.attn_mask[b])


def test_cascade_draft_is_the_decode_loop_and_refinement_edits_only_the_least_sure():
    from mmfm.generate import SamplingConfig, decode

    m = _model(std=0.3)
    prefix = torch.tensor([[1, 5, 6], [1, 7, 8]])
    out, draft, stats = cascade_decode(m, prefix, 10, mask_id=MASK, refine=0.0, temperature=0.0)
    want = decode(m, list(prefix), None, SamplingConfig(temperature=0.0), max_new_tokens=10)
    assert torch.equal(draft, torch.stack(want)) and torch.equal(out, draft) and stats.full_passes == 0
    out, draft, stats = cascade_decode(m, prefix, 10, mask_id=MASK, refine=0.4, steps=2, seed=4,
                                       allowed_range=(LO, HI))
    assert stats.full_passes == 2 and int(out.min()) >= LO and int(out.max()) < HI
    assert ((out != draft).sum(1) <= 4).all()
    with pytest.raises(ValueError, match="refine"):
        cascade_decode(m, prefix, 10, mask_id=MASK, refine=1.5)
