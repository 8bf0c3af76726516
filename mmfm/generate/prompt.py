"""Prompts in the unified vocabulary, built from text and optional modality inputs through an
exported model's tokenizers/ and vocab.json.

Layouts (the demo's training samples are <bos> <begin_text> caption <end_text> <begin_M> ... <end_M>
<eos>, so a caption-conditioned prompt ends where the model learned to start the modality):

    to M (not text):   <bos> <begin_text> prompt <end_text> [<begin_X> input <end_X>]... <begin_M>
    to text:           <bos> [<begin_X> input <end_X>]... <begin_text> prompt      (continued)
    unconditional (classifier-free guidance): <bos> <begin_M>

An empty prompt drops its text segment (for `to M`).
"""
from __future__ import annotations

import os

import torch

from mmfm.vocab import Vocab


class Tokenizers:
    """The export's tokenizers/<modality>/ folders, loaded on first use."""

    def __init__(self, root: str | None, vocab: Vocab):
        self.root, self.vocab = root, vocab
        self._loaded: dict = {}

    def __getitem__(self, modality: str):
        if modality not in self._loaded:
            if modality not in self.vocab.ranges:
                raise ValueError(f"unknown modality {modality!r}; this model's vocabulary has {list(self.vocab.ranges)}")
            folder = os.path.join(self.root or "", modality)
            if not self.root or not os.path.exists(os.path.join(folder, "tokenizer.yaml")):
                raise FileNotFoundError(f"no {modality} tokenizer at {folder}: the export needs tokenizers/{modality}/ "
                                        "(mmfm export --tokenizers DIR)")
            from mmfm.tokenizers import load_tokenizer

            tok = load_tokenizer(folder)
            size = self.vocab.ranges[modality].size
            if tok.vocab_size != size:
                raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but vocab.json gives "
                                 f"{modality} {size}")
            self._loaded[modality] = tok
        return self._loaded[modality]

    def segment_length(self, modality: str) -> int:
        """Tokens of one sample of a tokenized modality (the constrained segment's length)."""
        n = getattr(self[modality], "tokens_per_sample", None)
        if not isinstance(n, int):
            raise ValueError(f"the {modality} tokenizer has no fixed tokens_per_sample")
        return n


def encode_input(tokenizers: Tokenizers, modality: str, value) -> torch.Tensor:
    """A modality input (a decoded value or a file path) -> its tokenizer's local ids."""
    if isinstance(value, str):
        from mmfm.generate.outputs import read_input

        value = read_input(value, modality)
    tok = tokenizers[modality]
    if modality == "text":
        return tok.encode(value)
    return tok.encode(value).reshape(-1)


def build_prompt(vocab: Vocab, tokenizers: Tokenizers, text: str, to: str,
                 inputs: dict | None = None) -> torch.Tensor:
    """The prompt ids (1-D int64) for one row; see the module docstring for the layout."""
    if to not in vocab.ranges:
        raise ValueError(f"argument 'to' is {to!r}; this model can generate {list(vocab.ranges)}")
    if not isinstance(text, str):
        raise ValueError(f"argument 'prompt' must be a string, got {type(text).__name__}")
    segs = []
    for m, value in (inputs or {}).items():
        if m == "text":
            raise ValueError("inputs: text goes in 'prompt', not in inputs")
        segs.append((m, encode_input(tokenizers, m, value)))
    text_ids = tokenizers["text"].encode(text) if text else torch.zeros(0, dtype=torch.long)
    bos = torch.tensor([vocab.bos_id])
    if to == "text":
        body = vocab.encode_sample(segs, add_bos_eos=False)[0] if segs else torch.zeros(0, dtype=torch.long)
        return torch.cat([bos, body, torch.tensor([vocab.begin_id("text")]), vocab.to_global("text", text_ids)])
    if text:
        segs.insert(0, ("text", text_ids))
    body = vocab.encode_sample(segs, add_bos_eos=False)[0] if segs else torch.zeros(0, dtype=torch.long)
    return torch.cat([bos, body, torch.tensor([vocab.begin_id(to)])])


def unconditional_prompt(vocab: Vocab, to: str, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """`<bos> <begin_to>`: the prompt caption dropout trains (data.caption_dropout), which guidance
    contrasts with. Given the conditional `prompt`, whatever it already holds of the `to` segment
    (after its last `<begin_to>`: e.g. a physics run's first frames) is kept, so both rows of a
    guided pair continue the same segment at the same place."""
    head = torch.tensor([vocab.bos_id, vocab.begin_id(to)])
    if prompt is None:
        return head
    at = (prompt == vocab.begin_id(to)).nonzero()
    return torch.cat([head, prompt[int(at[-1]) + 1:].to(head.dtype)]) if at.numel() else head
