"""SuperBPE (mmfm/tokenizers/superbpe.py): the two-stage curriculum, its claim (fewer tokens per byte
than BPE at the same vocabulary on held-out text), exact round trips, saving, the CLI path."""
import json
import random
import re

import pytest
import torch

from mmfm.cli import main
from mmfm.tokenizers import ConfigError, build_tokenizer, load_config, load_tokenizer
from mmfm.tokenizers.superbpe import SuperBPEConfig

PHRASES = ["in the middle of", "as well as", "on the other hand", "at the same time", "for the first time",
           "the function returns", "a list of", "is used to"]
WORDS = ["value", "object", "module", "parser", "string", "buffer", "thread", "socket", "window", "record"]


def sentences(n: int, seed: int) -> list[str]:
    """Text whose multi-word expressions recur, as in natural text: superwords have something to learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(PHRASES) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        out.append(" ".join(parts).capitalize() + ".")
    return out


TRICKY = ["def f(x):\n        return x  # indented\n\n\tTabbed  double  spaced",
          "数据 and tokens: 3.14159 and 2718 — naïve café 🙂", "  leading and trailing  ", "a\n\n\nb"]


def _fit(t: int, seed: int = 0, vocab: int = 420, specials=()):
    cfg = SuperBPEConfig(vocab_size=vocab, transition_vocab_size=t, user_special_tokens=list(specials))
    return build_tokenizer("text_superbpe", cfg).fit(sentences(600, seed) + TRICKY)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fewer_tokens_than_bpe_at_the_same_vocabulary_on_held_out_text(seed):
    held = sentences(200, 100 + seed)
    bpe, sup = _fit(420, seed), _fit(340, seed)
    assert bpe.vocab_size == sup.vocab_size == 420
    n_bpe = sum(len(bpe.encode(s)) for s in held)
    n_sup = sum(len(sup.encode(s)) for s in held)
    assert n_sup < 0.8 * n_bpe, (n_sup, n_bpe)
    assert sup.bytes_per_token(held) > 1.2 * bpe.bytes_per_token(held)


def test_superwords_bridge_spaces_only_after_the_transition():
    inner_space = re.compile(r"[^ĠĊĉ]Ġ")   # a space (byte-level Ġ) after a non-whitespace character: across words
    bpe, sup = _fit(420), _fit(340)
    assert not [t for t in bpe.tok.get_vocab() if inner_space.search(t)]
    supers = [t for t in sup.tok.get_vocab() if inner_space.search(t)]
    assert len(supers) > 20 and "Ġthe" in sup.tok.get_vocab()
    assert any("Ġof" in t and "Ġthe" in t for t in supers)   # e.g. "in the middle of" pieces
    # stage 1 is the same run in both: the first 340 tokens agree
    v_bpe, v_sup = bpe.tok.get_vocab(), sup.tok.get_vocab()
    assert {t for t, i in v_bpe.items() if i < 340} == {t for t, i in v_sup.items() if i < 340}


def test_round_trip_digits_specials_and_saving(tmp_path):
    tok = _fit(340, specials=["<caption>"])
    for t in TRICKY + sentences(20, 9):
        ids = tok.encode(t)
        assert ids.dtype == torch.long and tok.decode(ids) == t
    pieces = [tok.tok.id_to_token(int(i)) for i in tok.encode("x 12345 y")]
    assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces)
    sid = tok.special_token_id("<caption>")
    assert tok.encode("<caption> a list of value").tolist()[0] == sid
    tok.save(str(tmp_path / "tok"))
    back = load_tokenizer(str(tmp_path / "tok"))
    assert type(back).__name__ == "SuperBPETokenizer" and back.config == tok.config
    for t in TRICKY:
        assert torch.equal(back.encode(t), tok.encode(t))
    # the unified export reads it as a tokenizer.json with dense ids
    from mmfm.export.hf_tokenizer import text_tokenizer_of

    _, names, _ = text_tokenizer_of(str(tmp_path / "tok"))
    assert len(names) == tok.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([tok.vocab_size])


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="transition_vocab_size"):
        build_tokenizer("text_superbpe", SuperBPEConfig(vocab_size=500, transition_vocab_size=600)).fit(["a b"])
    with pytest.raises(ValueError, match="vocab_size: must exceed"):
        build_tokenizer("text_superbpe", SuperBPEConfig(vocab_size=200, transition_vocab_size=200)).fit(["a b"])
    with pytest.raises(ValueError, match="'texts' holds no non-empty text"):
        build_tokenizer("text_superbpe", SuperBPEConfig()).fit(["", " "])
    with pytest.raises(ValueError, match="not trained"):
        build_tokenizer("text_superbpe", SuperBPEConfig()).encode("a")
    p = tmp_path / "t.yaml"
    p.write_text("tokenizer: text_superbpe\nmodel: {vocab_size: 1000, transition_vocab_size: 1200}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.transition_vocab_size"):
        load_config(str(p))


def test_cli_trains_and_eval_reports_the_bpe_baseline(tmp_path, capsys):
    from mmfm.data.synthetic import synthetic_sample
    from mmfm.data.writer import SampleShardWriter

    with SampleShardWriter(str(tmp_path / "shards"), prefix="text", shard_size=100) as w:
        for i, s in enumerate(sentences(400, 5) + TRICKY * 3):
            w.write({"__key__": f"t{i:05d}", "txt": s, "json": {**synthetic_sample("text", i)["json"]}})
    cfg = tmp_path / "sb.yaml"
    cfg.write_text(f"tokenizer: text_superbpe\nmodel: {{vocab_size: 420, transition_vocab_size: 340}}\n"
                   f"data: {{shards: '{tmp_path}/shards/text-*.tar', modality: text, holdout_fraction: 0.2}}\n"
                   f"train: {{out: '{tmp_path}/out'}}\n")
    assert main(["tokenizer", "train", "--config", str(cfg)]) == 0
    assert (tmp_path / "out/tokenizer/tokenizer.json").exists()
    js = tmp_path / "eval.json"
    assert main(["tokenizer", "eval", "--config", str(cfg), "--json", str(js)]) == 0
    recs = {r["impl"]: r for r in json.loads(js.read_text())}
    assert set(recs) == {"mmfm", "utf8_bytes", "bpe_same_vocab"}
    assert recs["bpe_same_vocab"]["vocab_size"] == recs["mmfm"]["vocab_size"] == 420
    assert recs["mmfm"]["bytes_per_token"] > 1.2 * recs["bpe_same_vocab"]["bytes_per_token"]
    assert "beats the baselines [utf8_bytes, bpe_same_vocab]" in capsys.readouterr().out
