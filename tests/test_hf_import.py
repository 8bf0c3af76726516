"""Starting from an existing LLM (train.init_from=HF_FOLDER, mmfm/models/hf_import.py,
mmfm/tokenizers/hf_text.py): a small Llama built here with transformers (random weights) and a
tokenizer trained here (a tokenizers BPE tokenizer.json, or a sentencepiece tokenizer.model) is
imported; on text-only input its logits equal the original's before any training; a short ZeRO-2
run on paired caption/image data lowers the loss; the run's export loads in transformers with the
original tokenizer plus the new tokens; bad folders fail before training, naming file and field."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmfm.models import ModelConfig, Transformer
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
IMAGE_SIZE = 64


def captions(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [f"a {r.choice(['small', 'large'])} {r.choice(COLOURS)} {r.choice(SHAPES)}" for _ in range(n)]


def train_tokenizer_json(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions(500, 0) + ["the colour of the shape is"] * 20, trainer)
    tok.save(path)


def make_llama(folder: str, kind: str = "json", tie: bool = False, shard: bool = True) -> int:
    """A Llama folder with its tokenizer: (tokenizer.json | tokenizer.model), random weights, the
    embedding rows equal to the tokenizer's size. Returns that size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    if kind == "json":
        train_tokenizer_json(os.path.join(folder, "tokenizer.json"))
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    else:
        from mmfm.tokenizers.text import TextConfig, TextTokenizer

        t = TextTokenizer(TextConfig(vocab_size=300)).fit(captions(500, 0))
        t.save(os.path.join(folder, "spm"))
        os.replace(os.path.join(folder, "spm", "spm.model"), os.path.join(folder, "tokenizer.model"))
        size = t.vocab_size
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie,
                                      initializer_range=0.2))
    hf.save_pretrained(folder, max_shard_size="60KB" if shard else "10GB")
    return size


def import_model(folder: str, tmp: str, sparse: bool = False, image_size: int = IMAGE_SIZE):
    from mmfm.models.hf_import import apply_llama_shape, check_llama_import, import_llama
    from mmfm.tokenizers.hf_text import import_text_tokenizer

    text = import_text_tokenizer(folder, os.path.join(tmp, "tokenizers", "text"))
    vocab = Vocab(text.vocab_size, {"image": image_size})
    check_llama_import(folder, vocab.ranges["text"].size)
    cfg = apply_llama_shape(ModelConfig(vocab_size=vocab.size, max_seq_len=256, modality_sparse=sparse,
                                        num_modalities=len(vocab.modality_names) if sparse else 0), folder)
    model = Transformer(cfg).eval()
    model.load_state_dict(import_llama(folder, cfg, vocab.ranges["text"].size, seed=0))
    return model, vocab, text


@pytest.mark.parametrize("kind,tie,sparse", [("json", False, False), ("model", True, False), ("json", False, True)])
def test_imported_model_equals_the_llm_on_text(kind, tie, sparse, tmp_path):
    from transformers import LlamaForCausalLM

    src = str(tmp_path / "llm")
    size = make_llama(src, kind, tie)
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))    # sharded
    model, vocab, text = import_model(src, str(tmp_path), sparse, image_size=512)
    assert vocab.ranges["text"].size == size and vocab.size == size + 512 + vocab.size - vocab.special_start
    hf = LlamaForCausalLM.from_pretrained(src).eval()
    ids = torch.stack([text.encode(c)[:6] for c in ("a small red circle", "a large blue square")])
    ids = torch.cat([ids, torch.randint(0, size, (2, 20), generator=torch.Generator().manual_seed(0))], 1)
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = model(ids, modality_ids=vocab.modality_table()[ids])
    assert torch.allclose(ours[..., :size], theirs, atol=1e-5, rtol=0), (ours[..., :size] - theirs).abs().max()
    # the new rows are drawn like the old ones: same mean and per-dimension spread, not zeros or noise
    for w in [model.embed_tokens.weight] + ([] if tie else [model.lm_head.weight]):
        old, new = w.detach()[:size].double(), w.detach()[size:].double()
        spread = old.std(0).mean()
        assert (new.mean(0) - old.mean(0)).abs().max() < 0.35 * spread
        ratio = (new.std(0) / old.std(0)).mean()
        assert 0.8 < float(ratio) < 1.2, float(ratio)
    # and the text tokenizer is the LLM's own: same ids as the folder's tokenizer
    if kind == "json":
        from tokenizers import Tokenizer

        orig = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
        for c in captions(50, 3):
            assert text.encode(c).tolist() == orig.encode(c, add_special_tokens=False).ids
    else:
        import sentencepiece as spm

        orig = spm.SentencePieceProcessor(model_file=os.path.join(src, "tokenizer.model"))
        for c in captions(50, 3):
            assert text.encode(c).tolist() == orig.encode(c)


def paired_shards(root: str, vocab: Vocab, text) -> tuple[str, str]:
    """Caption + image samples where the image tokens are a function of the caption's colour and
    shape (a learnable pairing), tokenized with the LLM's tokenizer."""
    from mmfm.train.tokens import write_token_shards

    def gen(split, n, seed):
        for i, c in enumerate(captions(n, seed)):
            _, _, colour, shape = c.split()
            base = COLOURS.index(colour) * 16 + SHAPES.index(shape) * 4
            image = (base + np.arange(16)) % IMAGE_SIZE
            ids, _ = vocab.encode_sample([("text", text.encode(c)), ("image", image)])
            # the shard schema labels token samples "text" (as synthetic_token_corpus does); the ids hold both
            yield f"{split}{i:05d}", ids.numpy(), {"modality": "text", "source": "test", "license": "Apache-2.0"}

    write_token_shards(gen("train", 400, 1), os.path.join(root, "tokens"), "train", shard_size=100)
    write_token_shards(gen("eval", 40, 2), os.path.join(root, "tokens"), "eval", shard_size=40)
    return os.path.join(root, "tokens")


def test_pretrain_from_llm_lowers_loss_and_exports_the_original_tokenizer_plus_new_tokens(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmfm.tokenizers.hf_text import import_text_tokenizer

    src = str(tmp_path / "llm")
    make_llama(src, "json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmfm.cli", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    toks = tmp_path / "tokenizers"
    p = run("tokenizer", "import-hf", src, "--out", str(toks / "text"))
    assert p.returncode == 0 and "hf_text" in p.stdout, p.stderr[-2000:]
    text = import_text_tokenizer(src, str(tmp_path / "check"))
    vocab = Vocab(text.vocab_size, {"image": IMAGE_SIZE})
    vocab.save(tmp_path / "vocab.json")
    shards = paired_shards(str(tmp_path), vocab, text)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""deepspeed: {REPO}/configs/deepspeed/zero2.json
model: {{max_seq_len: 64}}
data: {{shards: "{shards}/train-*.tar", eval_shards: "{shards}/eval-*.tar", vocab: "{tmp_path}/vocab.json", seq_len: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 2, weight_decay: 0.0}}
train: {{out: "{tmp_path}/run", steps: 30, micro_batch: 8, checkpoint_every: 30, progress: false, plot: false,
        threads: 1, init_from: "{src}"}}
""")
    p = run("pretrain", "--config", str(cfg))
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["eval_end"]["eval_loss_image"] < summary["eval_start"]["eval_loss_image"] - 0.5, summary
    run_cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert run_cfg["model"]["dim"] == 32 and run_cfg["model"]["n_kv_heads"] == 2   # the checkpoint's shape
    # round trip: export, load in transformers; the tokenizer is the LLM's plus the new tokens
    p = run("export", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--tokenizers", str(toks))
    assert p.returncode == 0, p.stderr[-3000:]
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    orig = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    assert len(hf_tok) == vocab.size
    for c in captions(30, 5):
        assert hf_tok.encode(c, add_special_tokens=False) == orig.encode(c, add_special_tokens=False).ids
        assert hf_tok.decode(orig.encode(c).ids) == orig.decode(orig.encode(c).ids)
    assert [orig.id_to_token(i) for i in range(text.vocab_size)] == hf_tok.convert_ids_to_tokens(
        list(range(text.vocab_size)))
    assert hf_tok.convert_ids_to_tokens(vocab.ranges["image"].start + 5) == "<|image_00005|>"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.tensor([[vocab.bos_id, vocab.begin_id("text")] + text.encode("a small red circle").tolist()])
    from mmfm.models.io import load

    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, load(str(tmp_path / "export"))(ids), atol=1e-4, rtol=0)


def test_bad_folders_fail_before_training_naming_file_and_field(tmp_path):
    from mmfm.models.hf_import import check_llama_import, read_llama_config

    src = str(tmp_path / "llm")
    size = make_llama(src, "json")
    # an architecture mmfm cannot map
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"neox/config\.json: architectures \['GPTNeoXForCausalLM'\]"):
        read_llama_config(str(neox))
    # a tokenizer whose size differs from the embedding rows
    bad_tok = tmp_path / "bad_tok"
    os.system(f"cp -r {src} {bad_tok}")
    d = json.load(open(bad_tok / "tokenizer.json"))
    d["added_tokens"].append({"id": size, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True})
    (bad_tok / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"bad_tok/tokenizer\.json: the tokenizer has {size + 1} tokens but "
                                         rf"model\.embed_tokens\.weight has {size} rows"):
        check_llama_import(str(bad_tok), size)
    # a shard the index names is missing
    no_shard = tmp_path / "no_shard"
    os.system(f"cp -r {src} {no_shard}")
    index = json.load(open(no_shard / "model.safetensors.index.json"))
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(no_shard / gone)
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json: weight_map names shard '{gone}'"):
        check_llama_import(str(no_shard), size)
    # the run's vocabulary built with another tokenizer
    with pytest.raises(ValueError, match=rf"data\.vocab: the vocabulary's text range has {size - 1} ids"):
        check_llama_import(src, size - 1)
    # through the command: the error, and no run folder (nothing trained)
    Vocab(size, {"image": 8}).save(tmp_path / "vocab.json")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""deepspeed: {REPO}/configs/deepspeed/zero2.json
model: {{}}
data: {{shards: "{tmp_path}/none-*.tar", vocab: "{tmp_path}/vocab.json", seq_len: 32}}
train: {{out: "{tmp_path}/run", steps: 2, progress: false, init_from: "{neox}"}}
""")
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "GPTNeoXForCausalLM" in p.stderr and "config.json" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()
