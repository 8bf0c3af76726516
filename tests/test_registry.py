"""One way to declare a component (mmfm/registry.py): every config file in configs/ loads and its
sections build their components; an unknown name of every kind of component fails naming the YAML
field and listing the valid names; tokenizer constructors leave the global random state alone."""
import glob
import json
import os
import random

import numpy as np
import pytest
import torch

from mmfm.models import MODELS, ModelConfig, build_model, load_model_config
from mmfm.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from mmfm.quantizers import QUANTIZERS, VectorQuantizer, build_quantizer, load_quantizer
from mmfm.registry import Registry, UnknownName
from mmfm.tokenizers import build_tokenizer, load_config, load_tokenizer
from mmfm.tokenizers.registry import TOKENIZERS
from mmfm.typed_config import ConfigError
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("cacheaug", "deepspeed", "finetune", "models", "pretrain", "tokenizers")


def _files(folder):
    return sorted(glob.glob(os.path.join(REPO, "configs", folder, "*.yaml"))
                  + glob.glob(os.path.join(REPO, "configs", folder, "*.json")))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ every config file loads
def test_the_config_folders_are_all_covered():
    found = sorted(d for d in os.listdir(os.path.join(REPO, "configs"))
                   if os.path.isdir(os.path.join(REPO, "configs", d)))
    assert found == sorted(FOLDERS), "a new configs/ folder needs a loader in test_every_config_file_loads"


@pytest.mark.parametrize("path", [p for f in FOLDERS for p in _files(f)], ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_file_loads(path):
    from mmfm.cacheaug.config import load_aug_config
    from mmfm.train.config import load_run_config, read_deepspeed

    folder = os.path.basename(os.path.dirname(path))
    if folder == "models":
        cfg = load_model_config(path)
        assert MODELS.get(cfg.arch).cls.__name__ == "Transformer"
    elif folder == "tokenizers":
        f = load_config(path)
        # text tokenizers (sentencepiece, SuperBPE) have nothing until fitted; the large image tokenizer
        # is slow to build and adds nothing here
        from mmfm.tokenizers.commands import is_text_tokenizer

        if not is_text_tokenizer(f.tokenizer) and "large" not in path:
            tok = build_tokenizer(f.tokenizer, f.model)
            assert type(tok) is TOKENIZERS.get(f.tokenizer).cls and tok.vocab_size >= 2
    elif folder == "pretrain":
        cfg = load_run_config(path)
        vocab = Vocab(64, {"image": 16, "audio": 16})
        assert type(build_objective(cfg.objective, vocab)) is OBJECTIVES.get(cfg.objective.kind).cls
        assert cfg.model.arch == "transformer"
    elif folder == "finetune":
        cfg = load_run_config(path, ["model=configs/models/tiny.yaml"])   # the model comes from --from
        assert cfg.finetune.method in ("full", "lora")
        assert cfg.objective.kind in OBJECTIVES.names()
    elif folder == "cacheaug":
        assert load_aug_config(path).coprocessor.num_latents >= 1
    else:
        ds, _ = read_deepspeed(path, path)
        assert isinstance(ds, dict)


# ------------------------------------------------------------------ unknown names
def _assert_lists(exc_info, names):
    msg = str(exc_info.value)
    assert "expected one of: " + ", ".join(sorted(names)) in msg, msg
    assert isinstance(exc_info.value, ConfigError)


def test_unknown_tokenizer_in_a_yaml_and_in_a_saved_folder(tmp_path):
    p = _write(tmp_path, "t.yaml", "tokenizer: imagee_conv\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: tokenizer: unknown tokenizer 'imagee_conv'") as e:
        load_config(p)
    _assert_lists(e, ["audio_codec", "hf_text", "image_1d", "image_conv", "image_tokenbridge", "physics", "shape3d", "text",
                      "text_superbpe", "video"])
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "tokenizer.yaml").write_text("tokenizer: nope\nformat_version: 1\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"saved/tokenizer\.yaml: tokenizer: unknown tokenizer 'nope'") as e:
        load_tokenizer(str(saved))
    _assert_lists(e, TOKENIZERS.names())
    with pytest.raises(KeyError):   # the older lookups raised KeyError; callers catching it still work
        build_tokenizer("nope", None)


def test_unknown_quantizer_in_a_tokenizer_config_and_in_a_section(tmp_path):
    p = _write(tmp_path, "t.yaml", "tokenizer: image_conv\nmodel: {quantizer: rvqq}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.quantizer: unknown quantizer 'rvqq'; "
                                          r"expected one of: fsq, lfq, none, vq$"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"q\.yaml: quantizer\.kind: unknown quantizer 'vqq'") as e:
        build_quantizer({"kind": "vqq", "dim": 4}, "q.yaml: quantizer")
    _assert_lists(e, ["dimwise", "fsq", "lfq", "multiscale_rvq", "rvq", "soft", "vq"])
    with pytest.raises(ConfigError, match=r"q\.yaml: quantizer\.kind: missing; expected one of: dimwise"):
        build_quantizer({"dim": 4}, "q.yaml: quantizer")
    with pytest.raises(ConfigError, match=r"q\.yaml: quantizer\.dimm: unknown field; quantizer 'vq' "
                                          r"\(VectorQuantizer\) takes: kind, dim, codebook_size"):
        build_quantizer({"kind": "vq", "dimm": 4}, "q.yaml: quantizer")
    vq = build_quantizer({"kind": "vq", "dim": 4, "codebook_size": 8, "seed": 3}, "q.yaml: quantizer")
    assert isinstance(vq, VectorQuantizer) and vq.codebook_size == 8
    assert torch.equal(vq.state_dict()["codebook"], VectorQuantizer(4, 8, seed=3).state_dict()["codebook"])


def test_unknown_objective_in_a_run_config_and_in_code(tmp_path):
    from mmfm.train.config import load_run_config

    p = _write(tmp_path, "run.yaml", "model: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, ffn_hidden: 64}\n"
                                     "deepspeed: {}\nobjective: {kind: mlm}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: objective\.kind: unknown objective 'mlm'") as e:
        load_run_config(p)
    _assert_lists(e, ["ar", "hybrid", "masked"])
    with pytest.raises(ValueError, match=r"^kind: unknown objective 'mlm'; expected one of: ar, hybrid, masked$"):
        build_objective(ObjectiveConfig(kind="mlm"), Vocab(20, {"image": 16}))
    # the section's other fields are still checked against ObjectiveConfig once the kind is known
    p = _write(tmp_path, "run2.yaml", "model: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, ffn_hidden: 64}\n"
                                      "deepspeed: {}\nobjective: {kind: masked, input_fractoin: 0.5}\n")
    with pytest.raises(ConfigError, match=r"run2\.yaml: objective\.input_fractoin: unknown field"):
        load_run_config(p)
    cfg = load_run_config(_write(tmp_path, "run3.yaml", "model: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, "
                                                        "ffn_hidden: 64}\ndeepspeed: {}\n"))
    assert cfg.objective.kind == "ar" and cfg.model.arch == "transformer"   # the defaults


def test_unknown_model_arch_in_a_model_file_a_run_config_and_in_code(tmp_path):
    from mmfm.train.config import load_run_config

    p = _write(tmp_path, "m.yaml", "model: {arch: mamba, dim: 32}\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: model\.arch: unknown model architecture 'mamba'; "
                                          r"expected one of: transformer$"):
        load_model_config(p)
    p = _write(tmp_path, "run.yaml", "model: {arch: rwkv}\ndeepspeed: {}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.arch: unknown model architecture 'rwkv'"):
        load_run_config(p)
    with pytest.raises(ConfigError, match=r"^model\.arch: unknown model architecture 'x'; expected one of: transformer"):
        build_model(ModelConfig(arch="x", vocab_size=8))
    cfg = load_model_config(_write(tmp_path, "ok.yaml", "model: {dim: 32, n_heads: 2, n_kv_heads: 2, ffn_hidden: 64, "
                                                        "n_layers: 1, vocab_size: 8}\n"))
    assert type(build_model(cfg)).__name__ == "Transformer"


def test_a_quantizer_file_written_before_the_registry_still_loads(tmp_path):
    """Files used to record the class name ("VectorQuantizer"); it is an alias of "vq"."""
    from safetensors.torch import save_file

    vq = VectorQuantizer(4, 8, seed=5)
    meta = {"format": "pt", "mmfm.quantizer": "VectorQuantizer", "mmfm.config": json.dumps(vq.config),
            "mmfm.format_version": "1"}
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(tmp_path / "old.safetensors"), metadata=meta)
    back = load_quantizer(tmp_path / "old.safetensors")
    assert type(back) is VectorQuantizer and torch.equal(back.state_dict()["codebook"], vq.state_dict()["codebook"])
    assert QUANTIZERS.get("VectorQuantizer").name == "vq"


# ------------------------------------------------------------------ the Registry itself
def test_registry_rejects_a_second_registration_and_checks_keyword_configs():
    reg = Registry("widget", field="kind", default="a")

    @reg.register("a", aliases=("OldA",))
    class A:
        def __init__(self, size: int, scale: float = 1.0):
            self.size, self.scale = size, scale

    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.register("a")(type("B", (), {}))
    with pytest.raises(ValueError, match="widget 'OldA' registered twice"):
        reg.register("OldA")(type("C", (), {}))
    kwargs = reg.config_from_dict({"size": 3}, "w.yaml: widget")          # kind defaults to "a"
    a = reg.build("OldA", kwargs, scale=2.0)
    assert isinstance(a, A) and (a.size, a.scale) == (3, 2.0) and A.registry_name == "a"
    with pytest.raises(ConfigError, match=r"w\.yaml: widget\.sise: unknown field; widget 'a' \(A\) takes: kind, "
                                          r"size, scale"):
        reg.config_from_dict({"sise": 3}, "w.yaml: widget")
    with pytest.raises(ConfigError, match=r"w\.yaml: widget: expected a mapping"):
        reg.config_from_dict([1], "w.yaml: widget")
    with pytest.raises(UnknownName, match=r"^kind: unknown widget 'b'; expected one of: a$"):
        reg.get("b")


# ------------------------------------------------------------------ tokenizers and the global RNG
def _small_tokenizers():
    from mmfm.tokenizers.audio import AudioConfig
    from mmfm.tokenizers.image import Image1DConfig, ImageConvConfig
    from mmfm.tokenizers.physics import PhysicsConfig
    from mmfm.tokenizers.shape3d import Shape3DConfig
    from mmfm.tokenizers.tokenbridge import TokenBridgeConfig
    from mmfm.tokenizers.video import VideoConfig

    return {
        "image_conv": ImageConvConfig(image_size=16, channels=8, downsamples=1, latent_dim=4, codebook_size=32),
        "image_1d": Image1DConfig(image_size=16, patch_size=4, width=32, depth=1, heads=2, num_tokens=8, latent_dim=3,
                                  fsq_levels=[5, 5, 5], token_mixing=True),
        "image_tokenbridge": TokenBridgeConfig(image_size=16, channels=8, downsamples=1, latent_dim=3, num_bins=8),
        "audio_codec": AudioConfig(clip_samples=1600, channels=4, strides=[4, 4, 5], latent_dim=8, codebook_size=16,
                                   num_levels=3),
        "physics": PhysicsConfig(grid=16, frames=2, width=8, downsamples=2, fsq_levels=[5, 5, 5], refine_width=8),
        "shape3d": Shape3DConfig(num_points=64, out_points=64, width=32, depth=1, heads=2, num_queries=4, latent_dim=8,
                                 codebook_size=16, scales=[1, 2, 4]),
        "video": VideoConfig(frames=3, image_size=16, patch_size=8, temporal_patch=2, width=32, depth=1, heads=2,
                             num_queries=4, fsq_levels=[5, 5, 5]),
    }


@pytest.mark.parametrize("name", sorted(_small_tokenizers()))
def test_building_a_tokenizer_leaves_the_global_rng_alone(name):
    import dataclasses

    cfg = _small_tokenizers()[name]
    weights = []
    for outer in (1, 2):   # the caller's own seed: it must neither change the weights nor be changed
        torch.manual_seed(outer)
        np.random.seed(outer)
        random.seed(outer)
        before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        tok = build_tokenizer(name, dataclasses.replace(cfg))
        assert torch.equal(torch.get_rng_state(), before[0])
        assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
        torch.manual_seed(outer)
        expected = torch.rand(4)
        torch.set_rng_state(before[0])
        assert torch.equal(torch.rand(4), expected)        # the caller's next draws are its own
        weights.append(tok.state_dict())
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_tokenizer(name, dataclasses.replace(cfg, seed=cfg.seed + 1)).state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())   # the seed is used
