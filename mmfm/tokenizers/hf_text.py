"""Text through an existing LLM's tokenizer: a Hugging Face `tokenizer.json` (the `tokenizers`
library) as mmfm's text tokenizer, so a model started from that LLM (train.init_from=HF_FOLDER,
mmfm/models/hf_import.py) sees its text as the LLM did, at the LLM's ids.

`import_text_tokenizer(HF_FOLDER, OUT)` saves the folder's tokenizer as an mmfm tokenizer folder:
`tokenizer.json` -> this class (`hf_text`); a sentencepiece `tokenizer.model` (no tokenizer.json) ->
the sentencepiece text tokenizer (`text`, mmfm/tokenizers/text.py) over the same model file. Either
way ids are the LLM's: encode adds no special tokens (mmfm's own <bos>/<begin_text> frame the text),
and vocab_size counts the added tokens, which is the number of embedding rows the LLM has for them.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from mmfm.tokenizers.base import write_config
from mmfm.tokenizers.registry import register

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class HFTextConfig:
    source: str = ""     # where the tokenizer came from (a record, not read back)


@register("hf_text", HFTextConfig)
class HFTextTokenizer:
    modality = "text"
    tokens_rule = "variable: the Hugging Face tokenizer's ids for the text, no special tokens added"

    def __init__(self, config: HFTextConfig, tokenizer=None):
        self.config, self.tok = config, tokenizer

    @classmethod
    def from_file(cls, path: str, source: str = "") -> "HFTextTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as exc:   # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({exc})") from None
        return cls(HFTextConfig(source=source or path), tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, sample) -> torch.Tensor:
        text = sample if isinstance(sample, str) else sample.get("txt") if isinstance(sample, dict) else None
        if not isinstance(text, str):
            raise ValueError("HFTextTokenizer.encode: argument 'sample' must be a str or a sample dict with a 'txt' "
                             f"string, got {type(sample).__name__}")
        return torch.tensor(self.tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def encode_batch(self, samples) -> list[torch.Tensor]:
        return [self.encode(s) for s in samples]

    def decode(self, tokens) -> str:
        t = torch.as_tensor(tokens).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(f"HFTextTokenizer.decode: every token must be in [0, {self.vocab_size}) (vocab_size)")
        return self.tok.decode(t.tolist(), skip_special_tokens=True)

    def special_token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"HFTextTokenizer: {token!r} is not a token of this vocabulary")
        return i

    def bytes_per_token(self, texts) -> float:
        n_bytes = n_tokens = 0
        for t in texts:
            n_bytes += len(t.encode("utf-8"))
            n_tokens += len(self.tok.encode(t, add_special_tokens=False).ids)
        return n_bytes / max(1, n_tokens)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, TOKENIZER_FILE + ".tmp")
        self.tok.save(tmp)
        os.replace(tmp, os.path.join(directory, TOKENIZER_FILE))
        write_config(directory, self.registry_name, self.config)

    @classmethod
    def load_from(cls, directory: str, config: HFTextConfig, device: str = "cpu") -> "HFTextTokenizer":
        tok = cls.from_file(os.path.join(directory, TOKENIZER_FILE))
        tok.config = config
        return tok


def import_text_tokenizer(folder: str, out: str):
    """The tokenizer of a Hugging Face model folder, saved as an mmfm text tokenizer in `out`; returns it."""
    json_path, spm_path = os.path.join(folder, TOKENIZER_FILE), os.path.join(folder, "tokenizer.model")
    if os.path.exists(json_path):
        tok = HFTextTokenizer.from_file(json_path, source=os.path.abspath(folder))
        tok.save(out)
        return tok
    if os.path.exists(spm_path):
        from mmfm.tokenizers.text import MODEL_FILE, TextConfig, TextTokenizer

        with open(spm_path, "rb") as f:
            proto = f.read()
        try:
            tok = TextTokenizer(TextConfig(), model_proto=proto)
        except Exception as exc:   # sentencepiece raises RuntimeError/OSError variants for a bad file
            raise ValueError(f"{spm_path}: not a sentencepiece model ({exc})") from None
        tok.config.vocab_size = tok.vocab_size
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(spm_path, os.path.join(out, MODEL_FILE))
        write_config(out, "text", tok.config)
        return tok
    raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} or tokenizer.model; init_from needs the checkpoint's "
                            "own tokenizer")
