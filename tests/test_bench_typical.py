"""The typical-sampling benchmark's measuring pieces (mmfm/bench/typical.py): n-gram repetition,
interpolation at a matched perplexity, reading text documents from real token shards, and
fixed-length continuations that stay in the text range."""
import math

import torch

from mmfm.bench.typical import continue_text, interpolate, nll, rep_n, text_documents
from mmfm.models import ModelConfig, Transformer
from mmfm.train.tokens import synthetic_token_corpus
from mmfm.vocab import Vocab


def test_rep_n_counts_repeated_ngrams():
    rows = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 1, 2, 1, 2], [7, 7, 7, 7, 7, 7]])
    assert rep_n(rows, 2).tolist() == [0.0, 1 - 2 / 5, 1 - 1 / 5]
    assert rep_n(rows, 3).tolist() == [0.0, 1 - 2 / 4, 1 - 1 / 4]


def test_interpolate_at_a_log_ppl():
    pts = [{"log_ppl": 2.0, "rep3": 0.1, "rep3_se": 0.02}, {"log_ppl": 1.0, "rep3": 0.3, "rep3_se": 0.04}]
    val, se = interpolate(pts, 1.25, "rep3")
    assert math.isclose(val, 0.25) and math.isclose(se, math.sqrt((0.75 * 0.04) ** 2 + (0.25 * 0.02) ** 2))
    assert interpolate(pts, 2.5, "rep3") is None


def test_documents_and_continuations(tmp_path):
    vocab = Vocab(40, {"image": 24})
    synthetic_token_corpus(str(tmp_path), vocab, n=40, seed=0)
    docs = text_documents(str(tmp_path / "tokens-*.tar"), vocab, 12, 5)
    assert len(docs) == 5 and all(len(d) >= 12 for d in docs)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    vocab_size=vocab.size, max_seq_len=64, init_std=0.3)).eval()
    prompts = torch.tensor([list(d[:6]) for d in docs])
    r = vocab.ranges["text"]
    cont = continue_text(model, prompts, 20, (r.start, r.stop), seed=1, temperature=2.0)
    assert cont.shape == (5, 20) and int(cont.min()) >= r.start and int(cont.max()) < r.stop
    greedy = continue_text(model, prompts, 20, (0, vocab.size), seed=1, temperature=0.0)
    # greedy continuations are the argmax ones, so their NLL is below that of hot samples
    assert (nll(model, prompts, greedy) < nll(model, prompts, cont)).all()
