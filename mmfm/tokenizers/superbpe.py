"""Text: SuperBPE (Liu et al. 2025, "SuperBPE: Space Travel for Language Models", arXiv:2503.13423).

A byte-level BPE learned in two stages (a pretokenization curriculum):
  1. subwords: ordinary BPE with whitespace pretokenization (GPT-2's regex: a token never spans a
     space) until the vocabulary holds `transition_vocab_size` tokens;
  2. superwords: BPE continues from stage 1's merges with the whitespace rule lifted, so new tokens
     may bridge spaces ("Ġof Ġthe" -> "Ġof the"), until `vocab_size` tokens.
`transition_vocab_size == vocab_size` is plain byte-level BPE with the same pretokenization: the
baseline the SuperBPE claim (fewer tokens per byte at the same vocabulary size) is measured
against (docs/benchmarks.md, "## tokenizer").

What stage 2 still splits on: line breaks (a superword stays within a line), runs of whitespace
(indentation stays its own token, as in stage 1) and digits (each digit its own piece, as the
sentencepiece tokenizer's split_digits). Both stages see the same text.

How stage 2 continues stage 1 with the stock `tokenizers` trainer (it cannot start from given
merges): each stage-2 chunk (a line fragment) is encoded with the stage-1 tokenizer and every
stage-1 token id is written as one private-use character; a fresh BPE trainer on those strings
learns merges of stage-1 tokens, which are mapped back to byte-level strings and appended after
stage 1's merges. At encode time the one BPE model applies all merges by rank over the stage-2
chunks; stage-1 merges never join across a space (no stage-1 token holds a space inside), so they
reproduce stage 1's segmentation and the stage-2 merges then join whole stage-1 tokens, as in
training.

Saved as `tokenizer.json` (the `tokenizers` library's format), so `mmfm export` and `mmfm
tokenize` read it like an imported LLM's tokenizer (mmfm/tokenizers/hf_text.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from mmfm.tokenizers.hf_text import TOKENIZER_FILE, HFTextTokenizer
from mmfm.tokenizers.registry import register

_PUA = 0xF0000   # supplementary private-use plane: one character per stage-1 token id in stage 2


@dataclass
class SuperBPEConfig:
    vocab_size: int = 2000
    transition_vocab_size: int = 1600    # t: stage 1 stops here; == vocab_size gives plain BPE
    user_special_tokens: list[str] = field(default_factory=list)
    min_frequency: int = 2               # a stage-2 merge must occur this often (a one-off line is no superword)

    def validate(self) -> None:
        base = 256 + len(self.user_special_tokens)
        if self.vocab_size <= base:
            raise ValueError(f"vocab_size: must exceed the 256 byte tokens + {len(self.user_special_tokens)} "
                             f"user_special_tokens = {base}, got {self.vocab_size}")
        if not base < self.transition_vocab_size <= self.vocab_size:
            raise ValueError(f"transition_vocab_size: must be in ({base}, vocab_size = {self.vocab_size}], got "
                             f"{self.transition_vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency: must be >= 1, got {self.min_frequency}")


def _pretokenizer(stage: int):
    from tokenizers import Regex, pre_tokenizers

    digits = pre_tokenizers.Digits(individual_digits=True)
    if stage == 1:   # whitespace pretokenization: GPT-2's regex inside ByteLevel
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    # a line break, and a run of whitespace less its last character (which joins the next word, as in
    # GPT-2's regex), stay pieces of their own: without the second rule stage 1's early "Ġ"+"Ġ" merges
    # would swallow the space of " x" after an indent, a segmentation stage 1 never made
    runs = pre_tokenizers.Split(Regex(r"\n+|\s+(?=\s)"), behavior="isolated")
    return pre_tokenizers.Sequence([runs, digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _bpe_tokenizer(vocab: dict, merges: list, stage: int, specials: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pretokenizer(stage)
    tok.decoder = decoders.ByteLevel()
    if specials:   # already in vocab (first ids); marking them added keeps them whole
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _model_of(tok) -> tuple[dict, list[tuple[str, str]]]:
    """(vocab, merges) of a trained BPE Tokenizer, from its JSON (merges saved as 'a b' or [a, b])."""
    m = json.loads(tok.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    return dict(m["vocab"]), merges


def _stage1(texts: list[str], c: SuperBPEConfig):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pretokenizer(1)
    trainer = trainers.BpeTrainer(vocab_size=c.transition_vocab_size, special_tokens=list(c.user_special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _model_of(tok)


def _stage2(texts: list[str], c: SuperBPEConfig, vocab: dict, merges: list) -> tuple[dict, list]:
    """Stage 1's (vocab, merges) extended with superword merges until vocab_size tokens."""
    from tokenizers import Tokenizer, models, trainers

    need = c.vocab_size - len(vocab)
    if need <= 0:
        return vocab, merges
    stage1 = _bpe_tokenizer(vocab, merges, 1, [])
    split = _pretokenizer(2)
    # chunks of the original text (offsets), each encoded by stage 1 and written one char per token
    chunks = [t[a:b] for t in texts for _, (a, b) in split.pre_tokenize_str(t)]
    chunks = [ch for ch in chunks if ch and not ch.isspace()]
    mapped = ["".join(chr(_PUA + i) for i in e.ids) for e in stage1.encode_batch(chunks, add_special_tokens=False)]
    mapped = [m for m in mapped if len(m) > 1]
    alphabet = sorted({ch for m in mapped for ch in m})
    inv = {i: s for s, i in vocab.items()}
    new_vocab, new_merges = dict(vocab), list(merges)
    ask = need
    while True:   # a stage-2 merge can yield a string stage 1 already has; ask for more until `need` are new
        t2 = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + ask, initial_alphabet=alphabet,
                                      min_frequency=c.min_frequency, show_progress=False, limit_alphabet=len(alphabet))
        t2.train_from_iterator(mapped, trainer)
        _, m2 = _model_of(t2)
        new_vocab, new_merges = dict(vocab), list(merges)
        for a, b in m2:
            sa = "".join(inv[ord(ch) - _PUA] for ch in a)
            sb = "".join(inv[ord(ch) - _PUA] for ch in b)
            new_merges.append((sa, sb))
            if sa + sb not in new_vocab:
                new_vocab[sa + sb] = len(new_vocab)
                if len(new_vocab) == c.vocab_size:
                    return new_vocab, new_merges
        if len(m2) < ask:   # the corpus has no more pairs at min_frequency: a smaller vocabulary
            return new_vocab, new_merges
        ask += need - (len(new_vocab) - len(vocab)) + 16


@register("text_superbpe", SuperBPEConfig)
class SuperBPETokenizer(HFTextTokenizer):
    tokens_rule = "variable: one token per byte-level BPE token (subwords, and superwords across spaces)"

    def __init__(self, config: SuperBPEConfig, tokenizer=None):
        super().__init__(config, tokenizer)

    def fit(self, texts) -> "SuperBPETokenizer":
        """Train both stages on an iterable of strings (documents, captions, transcripts)."""
        c = self.config
        c.validate()
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("SuperBPETokenizer.fit: argument 'texts' holds no non-empty text")
        vocab, merges = _stage1(texts, c)
        self.stage1_size = len(vocab)
        if c.transition_vocab_size < c.vocab_size:
            vocab, merges = _stage2(texts, c, vocab, merges)
        self.tok = _bpe_tokenizer(vocab, merges, 2 if c.transition_vocab_size < c.vocab_size else 1,
                                  list(c.user_special_tokens))
        return self

    def _require(self, op: str) -> None:
        if self.tok is None:
            raise ValueError(f"SuperBPETokenizer.{op}: the tokenizer is not trained; call fit(texts) or load it")

    @property
    def vocab_size(self) -> int:
        self._require("vocab_size")
        return super().vocab_size

    def encode(self, sample):
        self._require("encode")
        return super().encode(sample)

    def save(self, directory: str) -> None:
        self._require("save")
        super().save(directory)

    @classmethod
    def load_from(cls, directory: str, config: SuperBPEConfig, device: str = "cpu") -> "SuperBPETokenizer":
        from tokenizers import Tokenizer

        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"SuperBPETokenizer: {path} does not exist")
        return cls(config, Tokenizer.from_file(path))

