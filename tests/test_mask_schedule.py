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
