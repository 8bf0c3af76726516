"""mmfm.typed_config: the one YAML reader behind tokenizer, model and training configs."""
import pytest

from mmfm.models.config import load_model_config
from mmfm.tokenizers.config import load_config
from mmfm.typed_config import ConfigError, read_sections


def test_read_sections_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("model: {}\ntrian: {}\n")
    with pytest.raises(ConfigError, match=r"x.yaml: trian: unknown top-level field; expected model, train"):
        read_sections(bad, ("model", "train"))
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"x.yaml: not valid YAML"):
        read_sections(bad, ("model",))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"x.yaml: expected a mapping with model"):
        read_sections(bad, ("model",))
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read the config"):
        read_sections(tmp_path / "missing.yaml", ("model",))
    bad.write_text("model: {}\n")
    assert read_sections(bad, ("model", "train")) == {"model": {}}


def test_model_and_tokenizer_configs_use_it(tmp_path):
    empty = tmp_path / "m.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"m.yaml: model: missing"):
        load_model_config(empty)
    tok = tmp_path / "t.yaml"
    tok.write_text("tokenizer: text\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: modle: unknown top-level field"):
        load_config(tok)


def test_read_deepspeed_names_the_field_and_the_problem(tmp_path):
    """The one reader of `deepspeed:` fields (pretrain, cacheaug and tokenizer configs)."""
    from mmfm.train.config import read_deepspeed

    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"stage": 1}}')
    assert read_deepspeed(str(good), "run.yaml: deepspeed") == ({"zero_optimization": {"stage": 1}}, str(good))
    assert read_deepspeed({"a": 1}, "run.yaml: deepspeed") == ({"a": 1}, "")
    with pytest.raises(ConfigError, match=r"run.yaml: deepspeed: cannot read .*nope.json"):
        read_deepspeed(str(tmp_path / "nope.json"), "run.yaml: deepspeed")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 1")
    with pytest.raises(ConfigError, match=r"tok.yaml: deepspeed: .*bad.json is not valid JSON"):
        read_deepspeed(str(bad), "tok.yaml: deepspeed")
    with pytest.raises(ConfigError, match="expected a JSON file path or a mapping"):
        read_deepspeed(3, "run.yaml: deepspeed")


def test_config_files_named_in_a_config_are_relative_to_it(tmp_path, monkeypatch):
    """A pretrain config in its own folder tree names its model and DeepSpeed files relative to
    itself; it loads the same from any working directory, absolute paths are kept, data and
    output paths and command-line overrides stay relative to the working directory."""
    import json
    import shutil

    from mmfm.cacheaug.config import load_aug_config
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import packaged_config

    root = tmp_path / "recipes"
    (root / "models").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "models" / "m.yaml").write_text("model: {dim: 48, n_layers: 1, n_heads: 4, n_kv_heads: 2, "
                                            "ffn_hidden: 96, max_seq_len: 256}\n")
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg_path = root / "run" / "r.yaml"
    cfg_path.write_text("model: ../models/m.yaml\ndeepspeed: ../ds.json\n"
                        "data: {shards: tok/train-*.tar, seq_len: 32}\ntrain: {out: out/r}\n")
    for cwd in (tmp_path, root / "models"):
        monkeypatch.chdir(cwd)
        cfg = load_run_config(str(cfg_path))
        assert cfg.model.dim == 48 and cfg.deepspeed["zero_optimization"]["stage"] == 1
        assert cfg.deepspeed_path == str(root / "ds.json")
        assert cfg.data.shards == "tok/train-*.tar" and cfg.train.out == "out/r"
    # model.field overrides go into the file the config names; model=FILE overrides are cwd-relative
    monkeypatch.chdir(tmp_path)
    assert load_run_config(str(cfg_path), ["model.dim=64"]).model.dim == 64
    shutil.copy(root / "models" / "m.yaml", tmp_path / "other.yaml")
    (tmp_path / "other.yaml").write_text((tmp_path / "other.yaml").read_text().replace("48", "80"))
    assert load_run_config(str(cfg_path), ["model=other.yaml"]).model.dim == 80
    # an absolute path is kept; a missing relative one is named as resolved
    cfg_path.write_text(f"model: {root / 'models' / 'm.yaml'}\ndeepspeed: ds.json\n")
    with pytest.raises(ConfigError, match=r"deepspeed: cannot read .*recipes/run/ds.json"):
        load_run_config(str(cfg_path))
    # no deepspeed field: the shipped ZeRO-0 file, found wherever mmfm is
    cfg_path.write_text("model: ../models/m.yaml\n")
    assert load_run_config(str(cfg_path)).deepspeed_path == packaged_config("deepspeed/zero0.json")
    aug = root / "run" / "a.yaml"
    aug.write_text("decoder: exp\ndeepspeed: ../ds.json\ndata: {shards: tok/train-*.tar}\n")
    assert load_aug_config(str(aug)).deepspeed["zero_optimization"]["stage"] == 1


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
    """Every shipped pretrain, finetune and cacheaug config resolves the files it names (the
    repository's configs/ here; an installed wheel's mmfm/configs in tests/test_wheel.py)."""
    import glob
    import os

    from mmfm.cacheaug.config import load_aug_config
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import packaged_config

    monkeypatch.chdir(tmp_path)
    runs = sorted(glob.glob(packaged_config("pretrain/*.yaml")) + glob.glob(packaged_config("finetune/*.yaml")))
    assert len(runs) >= 7
    for p in runs:   # a finetune config takes its model from --from: a model file stands in here
        cfg = load_run_config(p, [] if "pretrain" in p else [f"model={packaged_config('models/tiny.yaml')}"])
        assert os.path.isabs(cfg.deepspeed_path) and os.path.exists(cfg.deepspeed_path), p
    assert load_aug_config(packaged_config("cacheaug/demo.yaml")).deepspeed_path == packaged_config("deepspeed/zero2.json")
    for p in glob.glob(packaged_config("tokenizers/*.yaml")):
        load_config(p)
