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
