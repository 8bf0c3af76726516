import pytest
import torch

from mmfm.models import ModelConfig, Transformer, load_model_config
from mmfm.models.hf import build_hf_llama, from_hf, to_hf
from mmfm.objectives import ObjectiveConfig, build_objective, loss_and_report
from mmfm.tokenizers.config import ConfigError
from mmfm.vocab import Vocab


def tiny(**kw):
    d = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=300, max_seq_len=128)
    d.update(kw)
    return ModelConfig(**d)


def test_param_count_matches_config():
    for cfg in (tiny(), tiny(tie_embeddings=True), tiny(modality_sparse=True, num_modalities=3)):
        assert Transformer(cfg).num_params() == cfg.num_params()
    cfg = tiny(modality_sparse=True, num_modalities=3)
    assert cfg.flops_per_token(64) == tiny().flops_per_token(64)  # MoT: same compute per token


def test_hf_llama_logits_equal_and_round_trip():
    torch.manual_seed(0)
    cfg = tiny()
    m = Transformer(cfg).eval()
    hf = build_hf_llama(cfg, m.state_dict()).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(m(ids), hf(ids).logits, atol=1e-5)
    back = from_hf(hf.state_dict(), cfg)
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k


def test_sdpa_matches_eager_and_causality():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    e = Transformer(tiny(attention="eager")).eval()
    e.load_state_dict(m.state_dict())
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        a, b = m(ids), e(ids)
        assert torch.allclose(a, b, atol=1e-5)
        ids2 = ids.clone()
        ids2[:, 20:] = 7
        assert torch.allclose(m(ids2)[:, :20], a[:, :20], atol=1e-5)  # the future does not leak


def test_modality_sparse_uses_each_modalitys_weights():
    torch.manual_seed(0)
    cfg = tiny(modality_sparse=True, num_modalities=3)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 300, (1, 16))
    mods = torch.tensor([[0] + [1] * 7 + [2] * 8])
    with torch.no_grad():
        base = m(ids, mods)
        m.layers[0].mlp.up_proj.weight[2].mul_(2.0)   # change modality 2's FFN only
        out = m(ids, mods)
    assert torch.allclose(out[:, :8], base[:, :8], atol=1e-6)   # causal: earlier tokens are modality 0/1
    assert not torch.allclose(out[:, 8:], base[:, 8:])
    with pytest.raises(ValueError, match="modality_ids"):
        m(ids)
    with pytest.raises(ValueError, match="modality-specific"):
        to_hf(m.state_dict(), cfg)


def test_configs_load_and_errors_name_field(tmp_path):
    for name in ("tiny", "tiny_mot", "small", "llama_1b"):
        load_model_config(f"configs/models/{name}.yaml")
    big = load_model_config("configs/models/llama_1b.yaml")
    big.vocab_size = 32000
    assert 1.0e9 < big.num_params() < 1.2e9
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  dim: 64\n  n_layayers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.n_layayers: unknown field"):
        load_model_config(p)
    p.write_text("model:\n  dim: 64\n  n_heads: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.n_heads"):
        load_model_config(p)
    p.write_text("model:\n  dim: sixty\n")
    with pytest.raises(ConfigError, match=r"model.dim: expected int"):
        load_model_config(p)


def _batch(vocab):
    segs = [("text", torch.arange(10)), ("image", torch.arange(12) % 16)]
    ids, mods = vocab.encode_sample(segs)
    ids = torch.stack([ids, ids.flip(0)])
    mods = vocab.modality_table()[ids]
    return ids, mods, torch.ones_like(ids, dtype=torch.bool)


def test_objectives_shapes_masks_and_per_modality_report():
    vocab = Vocab(20, {"image": 16})
    ids, mods, valid = _batch(vocab)
    g = torch.Generator().manual_seed(0)
    for kind in ("ar", "masked", "hybrid"):
        obj = build_objective(ObjectiveConfig(kind=kind, loss_weights={"image": 2.0}), vocab)
        p = obj.prepare(ids, mods, valid, g)
        assert p.labels.shape == ids.shape and (p.labels != -100).any()
        logits = torch.randn(*ids.shape, vocab.size, requires_grad=True)
        loss, sums, counts = loss_and_report(logits, p, obj.weights)
        loss.backward()
        assert torch.isfinite(loss) and counts.sum() == (p.labels != -100).sum()
        if kind == "masked":
            assert p.attn_mask.all() and ((p.input_ids == vocab.mask_id) == (p.input_ids != ids)).all()
            assert not ((p.labels != -100) & (p.input_ids != vocab.mask_id)).any()   # targets are hidden
        if kind == "hybrid":
            m = p.attn_mask[0]
            assert m[torch.ones_like(m).tril()].all() and not m.all()    # causal prefix + bidirectional suffix
    ar = build_objective(ObjectiveConfig(no_loss=["special"]), vocab)
    p = ar.prepare(ids, mods, valid)
    assert (p.labels[:, :-1][mods[:, 1:] != 0] == ids[:, 1:][mods[:, 1:] != 0]).all()
    _, _, counts = loss_and_report(torch.zeros(*ids.shape, vocab.size), p, ar.weights)
    assert counts[1] > 0 and counts[2] > 0


def test_objective_config_errors_name_field():
    vocab = Vocab(20, {"image": 16})
    with pytest.raises(ValueError, match="loss_weights.imagee"):
        build_objective(ObjectiveConfig(loss_weights={"imagee": 1.0}), vocab)
    with pytest.raises(ValueError, match="kind"):
        build_objective(ObjectiveConfig(kind="mlm"), vocab)
