"""Sequence packing with document masking (mmfm/models/transformer.py: doc_ids, Documents;
mmfm/objectives: document_mask, loss_on): a sample packed into a row with others computes what it
computes alone -- same logits, same per-token loss -- because it attends only to itself and its
rotary positions restart at 0; and the flash-attn varlen layout the CUDA path uses is checked
against the masked SDPA path here, without a GPU."""
import numpy as np
import pytest
import torch

from mmfm.models import Transformer
from mmfm.models.config import ModelConfig
from mmfm.models.transformer import Documents, attend, attend_varlen_reference
from mmfm.objectives import ObjectiveConfig, build_objective, model_loss_and_report
from mmfm.vocab import Vocab

VOCAB = Vocab(40, {"image": 30, "audio": 20})
TABLE = VOCAB.modality_table()


def samples(seed: int) -> list[torch.Tensor]:
    """Three samples as mmfm writes them: caption then image, image then caption (captioning), text."""
    g = np.random.default_rng(seed)
    cap = lambda n: ("text", g.integers(0, 40, n))          # noqa: E731
    img = lambda n: ("image", g.integers(0, 30, n))         # noqa: E731
    return [VOCAB.encode_sample(segs)[0] for segs in
            ([cap(5), img(9)], [img(7), cap(4)], [("text", g.integers(0, 40, 11))])]


def model_of(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96, vocab_size=VOCAB.size)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def packed_row(parts, seq_len: int) -> torch.Tensor:
    row = torch.full((seq_len,), VOCAB.pad_id, dtype=torch.long)
    row[:sum(len(p) for p in parts)] = torch.cat(parts)
    return row[None]


def prepare(ids, loss_on="all", document_mask=True):
    obj = build_objective(ObjectiveConfig(kind="ar", document_mask=document_mask, loss_on=loss_on), VOCAB)
    return obj, obj.prepare(ids, TABLE[ids], ids != VOCAB.pad_id)


@pytest.mark.parametrize("seed,arch", [(0, {}), (1, {"attention": "eager"}),
                                       (2, {"modality_sparse": True, "num_modalities": 3})])
@pytest.mark.parametrize("loss_on", ["all", "generated"])
def test_packed_batch_gives_each_samples_own_logits_and_loss(seed, arch, loss_on):
    model, parts = model_of(seed, **arch), samples(seed)
    ids = packed_row(parts, 60)
    obj, prep = prepare(ids, loss_on)
    assert prep.attn_mask is None and prep.doc_ids is not None
    with torch.no_grad():
        logits = model(prep.input_ids, prep.modality_ids, doc_ids=prep.doc_ids)
        _, ce = model.loss(prep.input_ids, prep.labels, modality_ids=prep.modality_ids, doc_ids=prep.doc_ids)
    start = 0
    for p in parts:
        _, alone = prepare(p[None], loss_on)
        with torch.no_grad():
            ref = model(alone.input_ids, alone.modality_ids)          # alone: plain causal, positions 0..n-1
            _, ref_ce = model.loss(alone.input_ids, alone.labels, modality_ids=alone.modality_ids)
        span = slice(start, start + len(p))
        torch.testing.assert_close(logits[0, span], ref[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ce[0, span], ref_ce[0], atol=2e-5, rtol=1e-5)
        assert ((prep.labels[0, span] != -100) == (alone.labels[0] != -100)).all()
        start += len(p)
    if loss_on == "generated":   # the caption of sample 2 (image then caption) has a loss, its image none
        lab = prep.labels[0, len(parts[0]):len(parts[0]) + len(parts[1])]
        gen = ids[0, len(parts[0]) + 1:len(parts[0]) + len(parts[1])]
        text = (TABLE[gen] == VOCAB.modality_names.index("text")).nonzero()
        # <bos> <begin_image> 7 <end_image> <begin_text> [4 caption] <end_text> <eos>: targets are the 6 after <begin_text>
        assert int((lab != -100).sum()) == 6 and (lab[:int(text[1])] == -100).all()


def test_without_document_mask_a_packed_sample_sees_its_predecessor():
    """The control: the same packed row without doc_ids gives the second sample other logits."""
    model, parts = model_of(0), samples(0)
    ids = packed_row(parts, 60)
    _, prep = prepare(ids, document_mask=False)
    with torch.no_grad():
        got = model(prep.input_ids, prep.modality_ids)[0, len(parts[0]):len(parts[0]) + len(parts[1])]
        ref = model(parts[1][None], TABLE[parts[1]][None])[0]
    assert (got - ref).abs().max() > 1e-2


def test_positions_restart_and_varlen_layout_matches_the_mask():
    """Documents: positions restart per sample; the flash-attn varlen layout (cu_seqlens over the
    rows end to end, a row start always starting a sample) computes what the block-diagonal mask does."""
    doc = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3], [0, 0, 1, 1, 1, 1, 2, 2]])
    d = Documents(doc)
    assert d.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 0, 1]]
    cu, longest = d.varlen()
    assert cu.tolist() == [0, 3, 5, 8, 10, 14, 16] and longest == 4
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)
        masked = attend(q, k, v, None, "sdpa", d)
        flat = [t.transpose(1, 2).reshape(16, t.shape[1], 16) for t in (q, k, v)]
        varlen = attend_varlen_reference(*flat, cu).view(2, 8, 4, 16).transpose(1, 2)
        torch.testing.assert_close(varlen, masked, atol=1e-5, rtol=1e-5)


def test_packed_training_loss_and_gradients_equal_the_samples_alone():
    """The trainer's path (model_loss_and_report on a packed micro-batch, the fused loss head): the
    loss and every parameter gradient equal the sums over the samples run one by one."""
    model, parts = model_of(3).train(), samples(3)
    obj, prep = prepare(packed_row(parts, 60))
    loss, _, counts = model_loss_and_report(model, prep, obj.weights, denominator=1.0)
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, n_alone = 0.0, 0
    for p in parts:
        _, alone = prepare(p[None])
        s, _, c = model_loss_and_report(model, alone, obj.weights, denominator=1.0)
        s.backward()
        total, n_alone = total + float(s.detach()), n_alone + int(c.sum())
    assert int(counts.sum()) == n_alone          # no label crosses from one sample to the next
    assert abs(float(loss.detach()) - total) < 1e-4 * total
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
