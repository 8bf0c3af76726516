"""The cosine mask-ratio schedule of the masked and hybrid objectives (objective.mask_schedule:
cosine, MMM / MaskGIT training): every sequence draws r = cos(pi/2 u), so the realised masked share
follows that law (mean 2/pi, P(r > 0.9) = 2/pi acos 0.9) instead of sitting at one fixed ratio."""
import math

import pytest
import torch

from mmfm.objectives import ObjectiveConfig, build_objective
from mmfm.vocab import Vocab

VOCAB = Vocab(64, {"image": 16})
B, L = 1200, 64
MEAN = 2 / math.pi
TAIL = 2 / math.pi * math.acos(0.9)       # P(cos(pi/2 u) > 0.9)


def text_batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, L), generator=g)   # text ids only: one modality, so the share is exact
    return ids, VOCAB.modality_table()[ids], torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_objective_draws_its_ratio_per_sequence(seed):
    ids, mods, valid = text_batch(seed)
    obj = build_objective(ObjectiveConfig(kind="masked", mask_schedule="cosine", target_fraction=0.25), VOCAB)
    p = obj.prepare(ids, mods, valid, torch.Generator().manual_seed(seed))
    share = (p.input_ids == VOCAB.mask_id).float().mean(1)          # masked share of each row
    assert abs(float(share.mean()) - MEAN) < 0.03
    assert abs(float((share > 0.9).float().mean()) - TAIL) < 0.04
    assert int((p.input_ids != VOCAB.mask_id).sum(1).min()) <= 2     # nearly all-masked rows occur
    targets = (p.labels != -100)
    assert (targets.sum(1) >= 1).all() and (targets.sum(1) <= int(0.25 * L)).all()
    assert not (targets & (p.input_ids != VOCAB.mask_id)).any()       # a target is never an input
    # fixed: every row at 1 - input_fraction
    fixed = build_objective(ObjectiveConfig(kind="masked"), VOCAB).prepare(ids, mods, valid,
                                                                          torch.Generator().manual_seed(seed))
    assert torch.allclose((fixed.input_ids == VOCAB.mask_id).float().mean(1), torch.full((B,), 0.5))


@pytest.mark.parametrize("seed", [0, 1])
def test_hybrid_objective_draws_its_ratio_per_sequence(seed):
    ids, mods, valid = text_batch(seed)
    g = torch.Generator().manual_seed(seed)
    cos = build_objective(ObjectiveConfig(kind="hybrid", mask_schedule="cosine", min_prefix=0.25), VOCAB)
    fixed = build_objective(ObjectiveConfig(kind="hybrid", min_prefix=0.25, mask_ratio=0.5), VOCAB)
    for obj, mean, spread in ((cos, MEAN, True), (fixed, 0.5, False)):
        p = obj.prepare(ids, mods, valid, g)
        suffix = p.attn_mask[:, :, -1]          # who sees the last position: the bidirectional suffix only
        share = (p.input_ids == VOCAB.mask_id).sum(1) / suffix.sum(1).clamp_min(1)
        assert abs(float(share.mean()) - mean) < 0.04
        assert (float((share > 0.9).float().mean()) > 0.15) == spread


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="mask_schedule"):
        build_objective(ObjectiveConfig(kind="masked", mask_schedule="linear"), VOCAB)


def caption_then_image(seed, n=400):
    """Rows <bos> <begin_text> caption <end_text> <begin_image> 16 image tokens <end_image> <eos>
    (captions of 3-8 tokens, then padding): the layout of a demo image sample."""
    g = torch.Generator().manual_seed(seed)
    v, r = VOCAB, VOCAB.ranges["image"]
    rows, gen = [], []
    for _ in range(n):
        cap = torch.randint(0, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        img = torch.randint(r.start, r.stop, (16,), generator=g).tolist()
        head = [v.bos_id, v.begin_id("text"), *cap, v.end_id("text"), v.begin_id("image")]
        rows.append(head + img + [v.end_id("image"), v.eos_id])
        gen.append((len(head), len(head) + 16))
    Lm = max(map(len, rows))
    ids = torch.full((n, Lm), v.pad_id, dtype=torch.long)
    valid = torch.zeros(n, Lm, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        valid[i, :len(row)] = True
    return ids, VOCAB.modality_table()[ids], valid, gen


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_loss_on_generated_masks_only_the_generated_segment(seed):
    """MaskGIT / Muse training (loss_on generated): every prompt token and the end marker / <eos>
    are seen; the image tokens are masked at the cosine ratio (all of them in some rows, the
    condition of masked decoding's first step) and exactly the masked ones are targets."""
    ids, mods, valid, gen = caption_then_image(seed)
    obj = build_objective(ObjectiveConfig(kind="masked", mask_schedule="cosine", loss_on="generated"), VOCAB)
    p = obj.prepare(ids, mods, valid, torch.Generator().manual_seed(seed))
    masked = p.input_ids == VOCAB.mask_id
    seg = torch.zeros_like(masked)
    for i, (a, b) in enumerate(gen):
        seg[i, a:b] = True
    assert not (masked & ~seg).any()                              # nothing outside the image tokens
    assert torch.equal(p.labels != -100, masked)                  # the targets are the masked tokens
    assert torch.equal(p.labels[masked], ids[masked])
    share = masked.sum(1).float() / 16
    assert abs(float(share.mean()) - MEAN) < 0.05 and (masked.sum(1) >= 1).all()
    assert int((share == 1).sum()) > 0                            # whole images masked occur
    # the 4M budgets instead mask prompt tokens too, and rarely leave a whole caption seen with the
    # image all masked
    p4 = build_objective(ObjectiveConfig(kind="masked", mask_schedule="cosine"), VOCAB).prepare(
        ids, mods, valid, torch.Generator().manual_seed(seed))
    assert ((p4.input_ids == VOCAB.mask_id) & ~seg & valid).any()


def test_hybrid_loss_on_generated_starts_its_block_inside_the_segment():
    """Conditional BAMM: the block starts at a uniform point of the image segment (sometimes at its
    first token: the whole image bidirectional), masks only image tokens, and the caption is
    always causal context with next-token labels."""
    ids, mods, valid, gen = caption_then_image(3)
    obj = build_objective(ObjectiveConfig(kind="hybrid", mask_schedule="cosine", loss_on="generated"), VOCAB)
    p = obj.prepare(ids, mods, valid, torch.Generator().manual_seed(3))
    starts = []
    for i, (a, b) in enumerate(gen):
        s = int(p.attn_mask[i, :, b - 1].nonzero().min())   # the block: the positions that see the last image token
        assert a <= s <= b - 1
        assert not p.attn_mask[i, :s].triu(1).any()       # before it, causal: no position sees a later one
        assert p.attn_mask[i, s:b, s:b].all()             # within it, bidirectional
        masked = (p.input_ids[i] == VOCAB.mask_id).nonzero().flatten().tolist()
        assert all(s <= t < b for t in masked)
        assert (p.labels[i, :a - 1] != -100).all()       # caption and markers: next-token labels
        starts.append(s - a)
    starts = torch.tensor(starts).float()
    assert int((starts == 0).sum()) > 5 and abs(float(starts.mean()) - 7.5) < 1.0
