"""Held-out bits per byte (mmfm/eval/bits_per_byte.py): the strided windows score each token once with
the context they claim, the totals convert nats per token to bits per byte, a lossy tokenizer is
counted as such, and an export folder gives the figure its in-memory model gives."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mmfm.eval.bits_per_byte import PREFIX, export_bits_per_byte, sequence_nats, text_bits_per_byte
from mmfm.models import ModelConfig, Transformer
from mmfm.tokenizers import build_tokenizer
from mmfm.tokenizers.data import is_held_out
from mmfm.tokenizers.superbpe import SuperBPEConfig
from mmfm.vocab import Vocab

WORDS = ["value", "object", "module", "parser", "string", "the", "of", "returns", "a", "list"]


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab_size,
                                   max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def superbpe():
    return build_tokenizer("text_superbpe", SuperBPEConfig(vocab_size=300, transition_vocab_size=280)).fit(
        documents(200, 0))


@pytest.mark.parametrize("n,window,stride,start", [(23, 8, 3, 2), (23, 8, 7, 1), (40, 16, 8, 2), (10, 32, 16, 2)])
def test_windows_score_each_token_once_with_its_window_context(n, window, stride, start):
    model = tiny_model(50)
    ids = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n + window))
    want = 0.0
    with torch.no_grad():
        for t in range(start, n):
            # the first window [b, b + window) that reaches past t scores it, with context ids[b:t]
            b = max(0, math.ceil((t + 1 - window) / stride) * stride)
            logits = model(ids[b:t].unsqueeze(0))[0, -1]
            want += float(F.cross_entropy(logits[None], ids[t:t + 1]))
    assert sequence_nats(model, ids, start, window, stride) == pytest.approx(want, rel=1e-5)


def test_uniform_model_gives_log2_vocab_bits_per_token(superbpe):
    vocab = Vocab(superbpe.vocab_size, {})
    model = tiny_model(vocab.size)
    with torch.no_grad():
        model.lm_head.weight.zero_()   # every logit 0: p = 1 / vocab.size for every token
    texts = documents(6, 1)
    r = text_bits_per_byte(model, vocab, superbpe, texts, window=16)
    tokens = sum(superbpe.encode(t).numel() + 2 for t in texts)   # + <end_text> <eos>
    n_bytes = sum(len(t.encode()) for t in texts)
    assert (r.documents, r.lossless_documents, r.tokens, r.bytes) == (6, 6, tokens, n_bytes)
    assert r.bits_per_token == pytest.approx(math.log2(vocab.size), rel=1e-6)
    assert r.bits_per_byte == pytest.approx(tokens * math.log2(vocab.size) / n_bytes, rel=1e-6)
    assert r.tokens_per_byte == pytest.approx(tokens / n_bytes)


def test_lossy_tokenizer_is_counted():
    from mmfm.tokenizers.text import TextConfig, TextTokenizer

    spm = TextTokenizer(TextConfig(vocab_size=100, byte_fallback=False)).fit(documents(200, 0))
    texts = [d for d in documents(20, 2) if "\n" in d][:4] + ["value of the list"]
    vocab = Vocab(spm.vocab_size, {})
    r = text_bits_per_byte(tiny_model(vocab.size), vocab, spm, texts, window=32)
    assert r.lossless_documents == 1   # sentencepiece turns the newlines into spaces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text-only demo-style corpus: (folder, [(key, document)]) in real shards."""
    from mmfm.data.synthetic import synthetic_sample
    from mmfm.data.writer import SampleShardWriter

    root = str(tmp_path_factory.mktemp("corpus"))
    docs = [(f"d{i:04d}", d) for i, d in enumerate(documents(60, 4))]
    with SampleShardWriter(root, prefix="text", shard_size=30) as w:
        for i, (key, d) in enumerate(docs):
            w.write({"__key__": key, "txt": d, "json": synthetic_sample("text", i)["json"]})
    return root, docs


def test_demo_token_stage_takes_text_alone(tmp_path, superbpe, corpus):
    """e2e.tokenize_corpus with only a text tokenizer (tools/superbpe_bpb.py): a text-only vocabulary
    and every document uncut, in the layout the eval scores."""
    import glob
    import io
    import tarfile

    import numpy as np

    from mmfm.demos.e2e import tokenize_corpus

    superbpe.save(str(tmp_path / "text"))
    rep = tokenize_corpus(corpus[0], {"text": str(tmp_path / "text")}, str(tmp_path / "tokens"), max_text_tokens=1 << 30)
    assert set(rep["modalities"]) == {"text"} and rep["train_samples"] + rep["eval_samples"] == len(corpus[1])
    vocab = Vocab.load(str(tmp_path / "tokens" / "vocab.json"))
    assert list(vocab.ranges) == ["text"] and vocab.size == Vocab(superbpe.vocab_size, {}).size
    written = {}
    for shard in glob.glob(str(tmp_path / "tokens" / "*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    written[m.name[:-4]] = np.load(io.BytesIO(tar.extractfile(m).read())).tolist()
    for key, d in corpus[1]:
        assert written[key] == vocab.encode_sample([("text", superbpe.encode(d))])[0].tolist()


def test_export_folder_matches_the_model_it_holds(tmp_path, superbpe, corpus):
    from mmfm.export import write_folder

    vocab = Vocab(superbpe.vocab_size, {})
    vocab.save(str(tmp_path / "vocab.json"))
    superbpe.save(str(tmp_path / "tokenizers" / "text"))
    model = tiny_model(vocab.size, seed=3)
    folder = write_folder(model.state_dict(), model.cfg, str(tmp_path / "export"), str(tmp_path / "vocab.json"),
                          str(tmp_path / "tokenizers"))
    texts = documents(4, 3)
    got = export_bits_per_byte(folder, texts, window=16)
    want = text_bits_per_byte(model, vocab, superbpe, texts, window=16)
    assert got.bits_per_byte == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert 0 < got.bits_per_byte and got.tokens == want.tokens

    # mmfm eval bpb: the held-out documents of real text shards (split by key hash)
    from mmfm.cli import main

    held = [d for key, d in corpus[1] if is_held_out(key, 0.1)]
    assert held
    js = tmp_path / "bpb.json"
    assert main(["eval", "bpb", "--model", folder, "--corpus", corpus[0], "--window", "16",
                 "--json", str(js)]) == 0
    rec = json.loads(js.read_text())
    assert rec["documents"] == len(held) and rec["window"] == 16
    assert rec["bits_per_byte"] == pytest.approx(text_bits_per_byte(model, vocab, superbpe, held, 16).bits_per_byte,
                                                 rel=1e-6)
    assert main(["eval", "bpb", "--model", folder, "--corpus", str(tmp_path)]) == 2   # no text-*.tar there


def test_bad_arguments_name_themselves(superbpe):
    model = tiny_model(50)
    with pytest.raises(ValueError, match="'stride'"):
        sequence_nats(model, torch.arange(10), PREFIX, window=8, stride=8)
    with pytest.raises(ValueError, match="'texts'"):
        text_bits_per_byte(model, Vocab(superbpe.vocab_size, {}), superbpe, ["", None], window=8)


def test_modality_sparse_model_is_scored_with_its_modality_ids(superbpe):
    """A modality-sparse model (groups > 1) routes each token by its modality: it gets the vocabulary's
    modality table beside the ids, and scores the text as the same model does on a full forward pass."""
    vocab = Vocab(superbpe.vocab_size, {"image": 16})
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    vocab_size=vocab.size, max_seq_len=64, modality_sparse=True,
                                    num_modalities=len(vocab.ranges) + 1)).eval()
    text = documents(1, 3)[0]
    r = text_bits_per_byte(model, vocab, superbpe, [text], window=64)
    ids, _ = vocab.encode_sample([("text", superbpe.encode(text))])
    assert ids.numel() <= 64
    with torch.no_grad():
        logits = model(ids[None], modality_ids=vocab.modality_table()[ids][None])[0]
    want = float(F.cross_entropy(logits[PREFIX - 1:-1], ids[PREFIX:], reduction="sum"))
    assert r.nats == pytest.approx(want, rel=1e-5)
