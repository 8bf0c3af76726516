"""DenseStep (mmfm/generate/step.py), the decode loop's one-token step, computes the logits that
Transformer.forward computes, compared by value (not only by argmax): in fp32 to float rounding;
in bf16 both are compared with the fp32 model's logits, and DenseStep's error must stay within
twice Transformer.forward's own bf16 error (it folds the norms into the weights and normalises
in bf16, so its rounding differs, but it must not be a different function). Equal-length and
ragged rows; the reference recomputes every row's whole sequence without a cache."""
import pytest
import torch

from mmfm.generate.step import DenseStep
from mmfm.models import KVCache, ModelConfig, Transformer

STEPS, V = 6, 97


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=V, max_seq_len=64)
    return Transformer(cfg).eval()


def _case(ragged):
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([7, 3, 5]) if ragged else torch.tensor([7, 7, 7])
    return torch.randint(0, V, (3, 7), generator=g), lens, torch.randint(0, V, (STEPS, 3), generator=g)


def _dense_step(model, ids, lens, feed, ragged):
    """Logits [STEPS, B, V] (fp32) of each fed token through DenseStep after a cached prefill."""
    cap = int(lens.max()) + STEPS + 1
    cache = KVCache.for_model(model, ids.shape[0], capacity=cap)
    with torch.no_grad():
        model(ids, cache=cache, counts=lens)
    step = DenseStep(model, cap)
    upto, out = int(lens.max()) + 1, []
    for t in range(STEPS):
        out.append(step(feed[t], cache, upto, ragged).float())
        upto += 1
    return torch.stack(out)


def _forward(model, ids, lens, feed):
    """The same logits from Transformer.forward on each row's whole sequence, no cache."""
    out = torch.empty(STEPS, ids.shape[0], V)
    with torch.no_grad():
        for b in range(ids.shape[0]):
            seq = ids[b, :int(lens[b])]
            for t in range(STEPS):
                seq = torch.cat([seq, feed[t, b:b + 1]])
                out[t, b] = model(seq[None])[0, -1].float()
    return out


@pytest.mark.parametrize("ragged", [False, True], ids=["equal-rows", "ragged-rows"])
def test_dense_step_logits_equal_forward(ragged):
    model = _model()
    ids, lens, feed = _case(ragged)
    ref = _forward(model, ids, lens, feed)
    assert ref.std() > 0.1                                 # logits with spread: a wrong function shows
    torch.testing.assert_close(_dense_step(model, ids, lens, feed, ragged), ref, atol=1e-4, rtol=1e-4)
    bf = _model().to(torch.bfloat16)
    err_step = float((_dense_step(bf, ids, lens, feed, ragged) - ref).abs().max())
    err_fwd = float((_forward(bf, ids, lens, feed) - ref).abs().max())
    assert err_fwd > 0                                     # bf16 really ran in bf16
    assert err_step <= 2 * err_fwd + 1e-3, (err_step, err_fwd)
