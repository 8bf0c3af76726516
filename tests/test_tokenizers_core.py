"""Config parsing, the text tokenizer, batch drawing (checkpoint / resume: test_tokenizer_cli.py)."""
import numpy as np
import pytest
import torch

from mmfm.tokenizers import ConfigError, build_tokenizer, load_config, load_tokenizer
from mmfm.tokenizers.data import random_batches
from mmfm.tokenizers.text import TextConfig

TEXTS = [f"The function number {i} returns {i * 37} items from the list; see section {i % 7}." for i in range(200)]
TEXTS += ["Il était une fois un café près de la gare — naïve façade.", "数据 and tokens: 3.14159 and 2718."]


def write(tmp_path, text):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return str(p)


def test_config_errors_name_the_file_and_field(tmp_path):
    p = write(tmp_path, "tokenizer: image_conv\nmodel: {image_size: 32, chanels: 8}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.chanels: unknown field"):
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\nmodel: {image_size: big}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.image_size: expected int, got 'big'"):
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\nmodel: {fsq_levels: [8, x]}\n")
    with pytest.raises(ConfigError, match=r"model\.fsq_levels\[1\]: expected int"):
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\ntrain: {steps: 1.5}\n")
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        load_config(p)
    p = write(tmp_path, "tokenizer: nope\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: tokenizer: unknown tokenizer 'nope'"):
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\nmodel: {quantizer: fsq, latent_dim: 3, fsq_levels: [8, 5]}\n")
    with pytest.raises(ConfigError, match=r"model\.fsq_levels: FSQ needs one level per latent channel"):
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\ntrain: {steps: 3, lr: 1}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: train\.lr: unknown field"):   # the optimizer is optim:
        load_config(p)
    p = write(tmp_path, "tokenizer: image_conv\noptim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: optim\.lr: expected a number"):
        load_config(p)
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it as the number it spells
    assert load_config(write(tmp_path, "tokenizer: image_conv\noptim: {lr: 1e-4}\n")).optim.lr == 1e-4
    p = write(tmp_path, "tokenizer: image_conv\nmodel: {image_size: 32}\noptim: {lr: 1, warmup_steps: 4}\n"
                        "train: {steps: 3}\n")
    cfg = load_config(p)
    assert cfg.model.image_size == 32 and cfg.train.steps == 3 and cfg.optim.lr == 1.0
    # fields the file leaves out are the tokenizers' defaults, not pretraining's
    assert (cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.weight_decay, cfg.optim.beta2) == (4, 1.0, 0.0,
                                                                                                          0.999)


def test_every_shipped_config_parses():
    import glob

    paths = sorted(glob.glob("configs/tokenizers/*.yaml"))
    assert paths, "configs/tokenizers/ is empty"
    for p in paths:
        load_config(p)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_text_tokenizer_round_trip_and_features(tmp_path, model_type):
    tok = build_tokenizer("text", TextConfig(model_type=model_type, vocab_size=400,
                                             user_special_tokens=["<image_caption>"])).fit(TEXTS)
    for t in TEXTS[-3:]:
        ids = tok.encode(t)
        assert ids.dtype == torch.long and tok.decode(ids) == t  # byte fallback: even CJK round-trips
        assert torch.equal(ids, tok.encode(t))
    # digit splitting: every digit its own piece
    pieces = [tok.sp.id_to_piece(int(i)) for i in tok.encode("12345")]
    assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces)
    # user special token kept whole
    sid = tok.special_token_id("<image_caption>")
    assert sid in tok.encode("<image_caption> a cat").tolist()
    assert tok.bytes_per_token(TEXTS[:50]) > 1.0  # merges pieces: fewer tokens than bytes
    tok.save(tmp_path / "tok")
    back = load_tokenizer(str(tmp_path / "tok"))
    assert torch.equal(back.encode(TEXTS[0]), tok.encode(TEXTS[0]))
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([tok.vocab_size])


def test_text_needs_text():
    with pytest.raises(ValueError, match="'texts' holds no non-empty text"):
        build_tokenizer("text", TextConfig()).fit(["", "  "])
    with pytest.raises(ValueError, match="must exceed"):
        build_tokenizer("text", TextConfig(vocab_size=200)).fit(TEXTS)


def test_random_batches_deterministic():
    data = torch.arange(10.0)[:, None]
    a = next(random_batches(data, 4, torch.Generator().manual_seed(3)))
    b = next(random_batches(data, 4, torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)
    assert np.isfinite(a.numpy()).all()
