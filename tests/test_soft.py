"""Soft Thinking (mmfm/generate/soft.py) against references: a one-hot concept is greedy decoding
(through the plain decode loop), a soft step's input is probs @ E (checked by recomputing the
whole sequence from embeddings without a cache), and the span ends where its rules say."""
import pytest
import torch

from mmfm.generate import SamplingConfig, decode
from mmfm.generate.soft import SoftConfig, concept, soft_decode
from mmfm.models import ModelConfig, Transformer

V = 48
GREEDY = SamplingConfig(temperature=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    # a wide init spreads the logits, so greedy argmaxes are not decided by rounding
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=V,
                      max_seq_len=64, init_std=0.3)
    return Transformer(cfg).eval()


def prompts():
    return [torch.tensor([1, 5, 9, 2]), torch.tensor([3, 4]), torch.tensor([7, 7, 8, 30, 11, 2])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_hot_concept_is_greedy_decoding(seed):
    model = tiny(seed)
    want = decode(model, prompts(), None, GREEDY, max_new_tokens=12)
    stats = {}
    got = soft_decode(model, prompts(), 12, SoftConfig(top_k=1, max_think=8), GREEDY, stats=stats)
    assert stats["soft_steps"].tolist() == [8, 8, 8]      # the soft path was taken, then discrete
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_soft_step_feeds_the_probability_weighted_embedding():
    model = tiny(3)
    soft = SoftConfig(top_k=0, top_p=1.0, temperature=1.0, max_think=2)
    got = soft_decode(model, prompts(), 3, soft, GREEDY)
    E = model.embed_tokens.weight
    with torch.no_grad():
        for p, g in zip(prompts(), got):
            # reference: no cache, no sampler; the concept is the plain softmax over every id
            xs = E[p]
            for t in range(2):
                logits = model(None, inputs_embeds=xs[None])[0, -1]
                probs = torch.softmax(logits, -1)
                assert int(g[t]) == int(probs.argmax())
                xs = torch.cat([xs, (probs @ E)[None]])
            logits = model(None, inputs_embeds=xs[None])[0, -1]
            assert int(g[2]) == int(logits.argmax())       # the discrete step after the span
            assert not torch.equal(xs[-1], E[int(g[1])])     # the concept was not a one-hot


def test_concept_embedding_and_entropy():
    E = torch.randn(V, 8, dtype=torch.float64).float()
    logits = torch.randn(2, V)
    emb, probs, ent = concept(logits, SoftConfig(top_k=3, top_p=1.0), E)
    top = logits.topk(3, -1)
    for b in range(2):
        w = torch.softmax(top.values[b], -1)
        assert torch.allclose(emb[b], (w[:, None] * E[top.indices[b]]).sum(0), atol=1e-5)
        assert torch.allclose(ent[b], -(w * w.log()).sum(), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2))


def test_cold_stop_and_end_of_thinking():
    model = tiny(4)
    base = SoftConfig(top_k=0, top_p=1.0, max_think=10)
    # entropy is always below 100 nats: the first step stops, the run is plain greedy decoding
    stats = {}
    got = soft_decode(model, prompts(), 6, SoftConfig(top_k=0, top_p=1.0, max_think=10, cold_stop_entropy=100.0),
                      GREEDY, stats=stats)
    assert stats["soft_steps"].tolist() == [0, 0, 0] and stats["cold_stops"].all()
    for w, g in zip(decode(model, prompts(), None, GREEDY, max_new_tokens=6), got):
        assert torch.equal(w, g)
    # three low-entropy steps in a row are needed: two soft steps, then the switch
    soft_decode(model, prompts(), 6, SoftConfig(top_k=0, top_p=1.0, max_think=10, cold_stop_entropy=100.0,
                                                cold_stop_steps=3), GREEDY, stats=stats)
    assert stats["soft_steps"].tolist() == [2, 2, 2]
    # the span ends where the concept's top token is end_think_id; that token is emitted
    free = soft_decode(model, prompts(), 8, base, GREEDY)
    row0 = free[0].tolist()
    at = next(i for i in range(1, 8) if row0[i] not in row0[:i])
    end = row0[at]
    ended = soft_decode(model, prompts(), 8, SoftConfig(top_k=0, top_p=1.0, max_think=10, end_think_id=end), GREEDY,
                        stats=stats)
    assert stats["soft_steps"][0] == at
    assert ended[0][:at + 1].tolist() == row0[:at + 1]


def test_bad_settings_name_the_field():
    model = tiny()
    with pytest.raises(ValueError, match="SoftConfig.temperature"):
        soft_decode(model, prompts(), 4, SoftConfig(temperature=0.0))
    with pytest.raises(ValueError, match="SoftConfig.end_think_id"):
        soft_decode(model, prompts(), 4, SoftConfig(end_think_id=V))
    with pytest.raises(ValueError, match="allowed_range"):
        soft_decode(model, prompts(), 4, allowed_range=(5, V + 1))


def test_allowed_range_holds_in_soft_and_discrete_steps():
    model = tiny(5)
    stats = {}
    out = soft_decode(model, prompts(), 10, SoftConfig(top_k=0, top_p=1.0, max_think=5), SamplingConfig(temperature=2.0),
                      allowed_range=(10, 20), stats=stats, seed=3)
    assert stats["soft_steps"].tolist() == [5, 5, 5]
    for o in out:
        assert int(o.min()) >= 10 and int(o.max()) < 20
