"""The Hugging Face side of `mmfm export` (mmfm/export/hf_tokenizer.py, card.py): tokenizer.json at
the unified ids against sentencepiece on held-out lines, the folder's other files, sharding by
huggingface_hub's helper, pipeline("text-generation") against `mmfm generate`, and lm-evaluation-harness
through `mmfm eval lm` against log-likelihoods and greedy answers computed with mmfm's own model.
Tokenizers and models are trained or built here, tiny; nothing is downloaded (HF_HUB_OFFLINE)."""
import json
import os
import random
import subprocess
import sys
import unicodedata

import pytest
import torch

from mmfm.models import ModelConfig, Transformer
from mmfm.tokenizers.text import TextConfig, TextTokenizer
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "lm_eval_tasks")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True, scope="module")
def offline():
    """transformers / datasets never reach for the network while this module runs."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield

WORDS = ("the a red green blue yellow circle square triangle small large sound of wave shape colour is café naïve "
         "Größe straße 東京 日本語 привет мир 😀 ﬁ ＡＢＣ ½ x² 3.14 2026 007 ǅ").split()
GAPS = [" ", " ", " ", "  ", "   ", "\t", " \t ", "", "\u3000", "\n", " \u00a0"]


def line(r: random.Random) -> str:
    """One line of mixed text: Unicode (accents, CJK, Cyrillic, emoji, NFKC-mapped forms), numbers,
    runs of spaces, tabs, newlines, and now and then a random code point or a combining mark (after a
    letter or a space-like character, never right after an NFKC-mapped one: hf_tokenizer.py's note)."""
    parts = []
    for _ in range(r.randint(1, 14)):
        w = r.choice(WORDS)
        if r.random() < 0.2:
            w = str(r.randint(0, 10 ** r.randint(1, 9)))
        if r.random() < 0.05:
            w = chr(r.randint(0x20, 0x2FFF))
            if unicodedata.category(w).startswith("M"):   # see the note on combining marks in hf_tokenizer.py
                w = "e" + w
        if r.random() < 0.03:   # a combining mark after a plain letter or a space-like character
            w = r.choice(["e", "o", "\u3000", "\t", " "]) + chr(r.randint(0x300, 0x36F))
        parts += [w, r.choice(GAPS)]
    s = "".join(parts)
    return ("  " + s) if r.random() < 0.2 else s


def corpus(seed: int, n: int) -> list[str]:
    r = random.Random(seed)
    return [line(r) for _ in range(n)]


def text_tokenizer(model_type: str) -> TextTokenizer:
    return TextTokenizer(TextConfig(model_type=model_type, vocab_size=2000, user_special_tokens=["<sep>"])).fit(
        corpus(0, 3000))


def build(root: str, model_type: str = "bpe", shard_mb: float = 0.1) -> tuple[str, TextTokenizer, Transformer]:
    from mmfm.export import write_folder

    tok = text_tokenizer(model_type)
    tok.save(os.path.join(root, "tokenizers", "text"))
    vocab = Vocab(tok.vocab_size, {"image": 100, "audio": 30})
    vocab.save(os.path.join(root, "vocab.json"))
    torch.manual_seed(0)
    # a wide init spreads the logits, so greedy argmaxes are not decided by rounding
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab.size,
                      max_seq_len=128, init_std=0.3)
    model = Transformer(cfg).eval()
    out = write_folder(model.state_dict(), cfg, os.path.join(root, "export"), os.path.join(root, "vocab.json"),
                       os.path.join(root, "tokenizers"), shard_mb=shard_mb)
    return out, tok, model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("hf_export")))


# ------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_encodes_and_decodes_1000_held_out_lines_like_sentencepiece(model_type, export, tmp_path):
    from transformers import AutoTokenizer

    if model_type == "bpe":
        folder, tok = export[0], export[1]
    else:   # the tokenizer files alone: AutoTokenizer needs no model
        from mmfm.export.hf_tokenizer import write_tokenizer_files

        tok = text_tokenizer("unigram")
        tok.save(str(tmp_path / "text"))
        folder = str(tmp_path / "hf")
        os.makedirs(folder)
        write_tokenizer_files(folder, str(tmp_path / "text"), Vocab(tok.vocab_size, {"image": 100}), 128)
    hf = AutoTokenizer.from_pretrained(folder)
    seen = set(corpus(0, 3000))
    held = [s for s in corpus(1, 1200) if s not in seen]   # held out: no line the tokenizer was trained on
    assert len(held) >= 1000
    assert sum(any(c.isdigit() for c in s) for s in held) > 300 and sum("  " in s for s in held) > 300
    assert sum(any(ord(c) > 0x2000 for c in s) for s in held) > 600
    extra = ["a<sep>b", "", " ", "   leading and trailing   ", "tab\tand\nnewline", "e\u0301 composed", "▁x"]
    for s in held + extra:
        ids = tok.sp.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, s
        assert hf.decode(ids) == tok.sp.decode(ids), s
    # with special tokens: the layout of an mmfm text prompt
    v = Vocab.load(os.path.join(folder, "vocab.json")) if model_type == "bpe" else Vocab(tok.vocab_size, {"image": 100})
    assert hf.encode("a red circle") == [v.bos_id, v.begin_id("text")] + tok.sp.encode("a red circle")
    assert hf.decode(hf.encode("a red circle"), skip_special_tokens=True) == "a red circle"


def test_every_non_text_id_is_a_named_special_token(export):
    from transformers import AutoTokenizer

    folder, tok, _ = export
    v = Vocab.load(os.path.join(folder, "vocab.json"))
    hf = AutoTokenizer.from_pretrained(folder)
    assert len(hf) == v.size
    img, aud = v.ranges["image"], v.ranges["audio"]
    names = hf.convert_ids_to_tokens([img.start, img.start + 42, aud.stop - 1, v.bos_id, v.mask_id,
                                      v.begin_id("image"), v.end_id("text")])
    assert names == ["<|image_00000|>", "<|image_00042|>", "<|audio_00029|>", "<|bos|>", "<|mask|>",
                     "<|begin_image|>", "<|end_text|>"]
    assert hf.convert_ids_to_tokens(list(range(tok.vocab_size))) == [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    special = set(hf.all_special_ids)
    assert set(range(v.special_start, v.size)) <= special
    # an image id in a sequence decodes to its name and is dropped with skip_special_tokens
    seq = tok.sp.encode("a red") + [img.start + 7]
    assert hf.decode(seq) == "a red<|image_00007|>" and hf.decode(seq, skip_special_tokens=True) == "a red"
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (v.bos_id, v.eos_id, v.pad_id,
                                                                                     v.mask_id)
    smap = json.load(open(os.path.join(folder, "special_tokens_map.json")))
    assert smap["bos_token"] == "<|bos|>" and "<|begin_audio|>" in smap["additional_special_tokens"]


# ------------------------------------------------------------------ the folder
def test_folder_shards_configs_and_card(export, tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import GenerationConfig, LlamaForCausalLM

    folder, _, model = export
    files = set(os.listdir(folder))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "README.md", "config.json", "vocab.json", "model.safetensors.index.json"} <= files
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s in files for s in shards)
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    assert set(index["weight_map"]) == set(hf.state_dict()) - {k for k in hf.state_dict() if "rotary" in k}
    # the split is huggingface_hub's: the same files for the same tensors and limit
    from mmfm.models.hf import to_hf

    ref = split_torch_state_dict_into_shards(to_hf(model.state_dict(), model.cfg), max_shard_size=int(0.1 * 2 ** 20))
    assert ref.tensor_to_filename == index["weight_map"]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    v = Vocab.load(os.path.join(folder, "vocab.json"))
    g = GenerationConfig.from_pretrained(folder)
    assert (g.bos_token_id, g.pad_token_id, sorted(g.eos_token_id)) == (v.bos_id, v.pad_id,
                                                                       sorted([v.eos_id, v.end_id("text")]))
    text = v.ranges["text"]
    assert set(g.suppress_tokens) == set(range(text.stop, v.size)) - {v.eos_id, v.end_id("text")}
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "| image | [" in card and "AutoTokenizer" in card and "<|image_00123|>" in card
    # a re-export into the same folder with one shard leaves no stale shard behind
    from mmfm.export import write_folder

    write_folder(model.state_dict(), model.cfg, str(tmp_path / "re"), os.path.join(folder, "vocab.json"),
                 shard_mb=0.1)
    write_folder(model.state_dict(), model.cfg, str(tmp_path / "re"), os.path.join(folder, "vocab.json"))
    assert sorted(f for f in os.listdir(tmp_path / "re") if "safetensors" in f) == ["model.safetensors"]


# ------------------------------------------------------------------ generation
def test_pipeline_greedy_equals_mmfm_generate(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from mmfm.generate import Bundle, SamplingConfig

    folder, tok, _ = export
    bundle = Bundle.load(folder)
    pipe = pipeline("text-generation", model=folder)
    hf_tok, hf = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    same_text = 0
    for prompt in ["a red circle", "the blue  wave 2026", "東京 small", "x", "the", "red"]:
        ours = bundle.generate(prompt, "text", sampling=SamplingConfig(temperature=0.0), max_new_tokens=16)[0]
        assert len(ours.tokens) > 0
        enc = hf_tok(prompt, return_tensors="pt")
        ids = hf.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc.input_ids.shape[1]:]
        v = bundle.vocab
        if int(ids[-1]) in (v.eos_id, v.end_id("text")):   # mmfm drops the stop token
            ids = ids[:-1]
        assert ids.tolist() == ours.tokens.tolist(), prompt
        theirs = pipe(prompt, max_new_tokens=16, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert theirs == hf_tok.decode(ours.tokens), prompt
        if "\ufffd" not in ours.value:   # decoders differ only on invalid UTF-8 byte runs (hf_tokenizer.py)
            assert theirs == ours.value, prompt
            same_text += 1
    assert same_text >= 2


# ------------------------------------------------------------------ lm-evaluation-harness
def _mmfm_loglik(model, vocab, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) with mmfm's model, ids split the way lm_eval splits them (encode
    the whole string, the continuation is what follows the context's own encoding)."""
    head = [vocab.bos_id, vocab.begin_id("text")]
    whole = head + tok.sp.encode(context + continuation)
    ctx = head + tok.sp.encode(context)
    n = len(whole) - len(ctx)
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, modality_ids=vocab.modality_table()[ids])[0].double(), -1)
    return float(sum(logp[len(whole) - 1 - n + i, whole[len(whole) - n + i]] for i in range(n)))


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_mmfm_eval_lm_runs_lm_eval_tasks_and_matches_mmfm(layout, export, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra")
    pytest.importorskip("accelerate", reason="lm_eval's hf model imports accelerate (the eval extra)")
    from mmfm.generate import Bundle, SamplingConfig

    # sparse: lm_eval loads the folder's modeling_mmfm.py (trust_remote_code, set by mmfm eval lm)
    folder, tok, model = export if layout == "dense" else build_sparse(str(tmp_path / "sparse"))
    out = tmp_path / "lm.json"
    # about 20 s on an idle machine; the wide limit is for a machine shared with training runs
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "eval", "lm", "--model", folder, "--tasks", "mmfm_colors_mc",
                        "mmfm_colors_gen", "--include-path", TASKS, "--json", str(out), "--log-samples"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, **OFFLINE}, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mmfm_colors_mc" in p.stdout and "exact_match" in p.stdout
    data = json.load(open(out))
    res = data["results"]
    assert 0.0 <= res["mmfm_colors_mc"]["acc,none"] <= 1.0 and "exact_match,none" in res["mmfm_colors_gen"]
    assert data["n-samples"]["mmfm_colors_mc"]["effective"] == 12
    vocab = Vocab.load(os.path.join(folder, "vocab.json"))
    # loglikelihood: every choice's score is mmfm's log-probability of it; acc follows from them
    hits = []
    for s in data["samples"]["mmfm_colors_mc"]:
        scores = [r[0][0] for r in s["resps"]]
        for (context, continuation), got in zip(s["arguments"], scores):
            assert abs(got - _mmfm_loglik(model, vocab, tok, context, continuation)) < 1e-3
        hits.append(max(range(len(scores)), key=scores.__getitem__) == s["target"])
    assert abs(res["mmfm_colors_mc"]["acc,none"] - sum(hits) / len(hits)) < 1e-9
    # generation: lm_eval's greedy answers are mmfm generate's, cut at the task's stop string
    from transformers import AutoTokenizer

    bundle, hf_tok = Bundle.load(folder), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    for s in data["samples"]["mmfm_colors_gen"]:
        context, kwargs = s["arguments"][0]
        ours = bundle.generate(context, "text", sampling=SamplingConfig(temperature=0.0),
                               max_new_tokens=kwargs["max_gen_toks"])[0]
        assert s["resps"][0][0] == hf_tok.decode(ours.tokens).split("\n")[0], context


def test_bad_input_names_the_file_and_field(export, tmp_path):
    from mmfm.export.hf_tokenizer import write_tokenizer_files

    folder, tok, _ = export
    with pytest.raises(ValueError, match=r"spm\.model.*text range has 10 ids"):
        write_tokenizer_files(str(tmp_path), os.path.join(folder, "tokenizers", "text"), Vocab(10, {"image": 4}), 64)
    plain = tmp_path / "no_tok"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    run = [sys.executable, "-m", "mmfm.cli", "eval", "lm", "--tasks", "mmfm_colors_mc", "--include-path", TASKS]
    p = subprocess.run(run + ["--model", str(plain)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "no tokenizer.json" in p.stderr and "--tokenizers" in p.stderr
    pytest.importorskip("lm_eval")
    p = subprocess.run([*run[:-4], "--tasks", "no_such_task", "--include-path", TASKS, "--model", folder],
                       capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **OFFLINE})
    assert p.returncode == 2 and "unknown task 'no_such_task'" in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------ modality-sparse: trust_remote_code
def build_sparse(root: str, tie: bool = False) -> tuple[str, TextTokenizer, Transformer]:
    from mmfm.export import write_folder

    r = random.Random(0)
    ascii_words = [w for w in WORDS if w.isascii()]
    tok = TextTokenizer(TextConfig(vocab_size=400)).fit([" ".join(r.choices(ascii_words, k=8)) for _ in range(400)])
    tok.save(os.path.join(root, "tokenizers", "text"))
    vocab = Vocab(tok.vocab_size, {"image": 64, "audio": 32})
    vocab.save(os.path.join(root, "vocab.json"))
    torch.manual_seed(1)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab.size,
                      max_seq_len=128, init_std=0.3, modality_sparse=True, num_modalities=len(vocab.modality_names),
                      tie_embeddings=tie)
    model = Transformer(cfg).eval()
    out = write_folder(model.state_dict(), cfg, os.path.join(root, "export"), os.path.join(root, "vocab.json"),
                       os.path.join(root, "tokenizers"), shard_mb=0.1)
    return out, tok, model


@pytest.mark.parametrize("tie", [False, True])
def test_sparse_export_loads_with_trust_remote_code_and_logits_equal_mmfm(tie, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _, model = build_sparse(str(tmp_path), tie)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmfm.MmfmForCausalLM"
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).num_groups == model.cfg.groups == 4
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    v = Vocab.load(os.path.join(folder, "vocab.json"))
    # rows that cross every modality's range, its markers and the specials: every weight group is used
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v.size, (3, 40), generator=g)
    ids[0, :8] = torch.tensor([v.bos_id, v.begin_id("image"), v.ranges["image"].start + 3, v.end_id("image"),
                               v.begin_id("text"), 5, 6, v.end_id("text")])
    table = v.modality_table()
    assert set(table[ids].unique().tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        ours = model(ids, modality_ids=table[ids])
        theirs = hf(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    # a group's weights matter: the same ids through the wrong groups give other logits
    with torch.no_grad():
        wrong = model(ids, modality_ids=torch.zeros_like(ids))
    assert (wrong - ours).abs().max() > 1e-2


def test_sparse_export_generates_like_mmfm_without_mmfm_installed(tmp_path):
    from mmfm.generate import Bundle, SamplingConfig

    folder, tok, _ = build_sparse(str(tmp_path))
    bundle = Bundle.load(folder)
    expected = {}
    for prompt in ["a red circle", "the small"]:
        ours = bundle.generate(prompt, "text", sampling=SamplingConfig(temperature=0.0), max_new_tokens=12)[0]
        expected[prompt] = ours.tokens.tolist()
    # transformers alone (import mmfm fails in this process): the cached decode of generate, greedy
    script = f"""
import json, sys
sys.modules["mmfm"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = {folder!r}
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
out = {{}}
for p in {list(expected)!r}:
    enc = tok(p, return_tensors="pt")
    ids = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    out[p] = ids
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **OFFLINE, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    v = bundle.vocab
    for prompt, ids in got.items():
        if ids and ids[-1] in (v.eos_id, v.end_id("text")):
            ids = ids[:-1]
        assert ids == expected[prompt] and len(ids) > 0, prompt
