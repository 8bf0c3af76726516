"""Text: sentencepiece (BPE or unigram) trained on the corpus text.

Byte fallback (an unknown character becomes its UTF-8 bytes, so nothing maps to <unk>), digit
splitting (every digit its own piece: numbers tokenize consistently) and user special tokens
(kept whole, never split). The metric is bytes per token: UTF-8 bytes of the text / tokens.

Training is sentencepiece's own trainer, in-process (milliseconds on the demo corpus); the
model is saved as sentencepiece's protobuf `spm.model` next to `tokenizer.yaml`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import torch

from mmfm.tokenizers.base import write_config
from mmfm.tokenizers.registry import register

MODEL_FILE = "spm.model"


@dataclass
class TextConfig:
    model_type: str = "bpe"          # bpe or unigram
    vocab_size: int = 1000
    byte_fallback: bool = True
    split_digits: bool = True
    user_special_tokens: list[str] = field(default_factory=list)
    character_coverage: float = 1.0
    max_sentence_length: int = 16384

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: must be 'bpe' or 'unigram', got {self.model_type!r}")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size: must be >= 8, got {self.vocab_size}")


@register("text", TextConfig)
class TextTokenizer:
    modality = "text"

    def __init__(self, config: TextConfig, model_proto: bytes | None = None):
        self.config = config
        self.sp = None
        if model_proto is not None:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
            self._proto = model_proto

    # -- training -------------------------------------------------------------------------
    def fit(self, texts) -> "TextTokenizer":
        """Train on an iterable of strings (documents, captions, transcripts)."""
        import sentencepiece as spm

        c = self.config
        c.validate()
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError("TextTokenizer.fit: argument 'texts' holds no non-empty text")
        if c.byte_fallback:
            need = 256 + 4 + len(c.user_special_tokens)
            if c.vocab_size <= need:
                raise ValueError(f"TextTokenizer.fit: vocab_size {c.vocab_size} must exceed {need} with "
                                 "byte_fallback (256 bytes + specials + user tokens)")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, model_type=c.model_type, vocab_size=c.vocab_size,
            byte_fallback=c.byte_fallback, split_digits=c.split_digits,
            user_defined_symbols=list(c.user_special_tokens), character_coverage=c.character_coverage,
            max_sentence_length=c.max_sentence_length, hard_vocab_limit=False, minloglevel=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, train_extremely_large_corpus=False)
        self._proto = buf.getvalue()
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        return self

    def _require(self, op: str) -> None:
        if self.sp is None:
            raise ValueError(f"TextTokenizer.{op}: the tokenizer is not trained; call fit(texts) or load it")

    # -- interface ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        self._require("vocab_size")
        return self.sp.get_piece_size()

    tokens_rule = "variable: one token per sentencepiece piece of the text (see bytes_per_token)"

    @staticmethod
    def _text_of(sample) -> str:
        if isinstance(sample, str):
            return sample
        if isinstance(sample, dict) and isinstance(sample.get("txt"), str):
            return sample["txt"]
        raise ValueError("TextTokenizer.encode: argument 'sample' must be a str or a sample dict with a 'txt' "
                         f"string, got {type(sample).__name__}")

    def encode(self, sample) -> torch.Tensor:
        self._require("encode")
        return torch.tensor(self.sp.encode(self._text_of(sample)), dtype=torch.long)

    def encode_batch(self, samples) -> list[torch.Tensor]:
        """Variable length: a list of 1-D tensors (pad with the vocab's <pad> when packing)."""
        return [self.encode(s) for s in samples]

    def decode(self, tokens) -> str:
        self._require("decode")
        t = torch.as_tensor(tokens).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(f"TextTokenizer.decode: every token must be in [0, {self.vocab_size}) (vocab_size)")
        return self.sp.decode(t.tolist())

    def special_token_id(self, token: str) -> int:
        self._require("special_token_id")
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise ValueError(f"TextTokenizer: {token!r} is not a piece of this vocabulary")
        return i

    def bytes_per_token(self, texts) -> float:
        n_bytes = n_tokens = 0
        for t in texts:
            n_bytes += len(t.encode("utf-8"))
            n_tokens += len(self.sp.encode(t))
        return n_bytes / max(1, n_tokens)

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str) -> None:
        self._require("save")
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, MODEL_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, os.path.join(directory, MODEL_FILE))
        write_config(directory, self.registry_name, self.config)

    @classmethod
    def load_from(cls, directory: str, config: TextConfig, device: str = "cpu") -> "TextTokenizer":
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            return cls(config, model_proto=f.read())
