"""Held-out bits per byte of an export's text side: the loss that compares models with different
text tokenizers (SuperBPE against BPE, issue 19), because it is per byte of text, not per token.

    bits/byte = (sum over documents of the model's NLL of the document's tokens, in nats) / ln 2
                / (the documents' UTF-8 bytes)

Each document is laid out as mmfm trains text (<bos> <begin_text> tokens <end_text> <eos>, the
unified vocabulary) and every token after <bos> <begin_text> is scored, so <end_text> / <eos> (the
document's end) count too, the same two tokens for any tokenizer. A document longer than `window`
tokens is scored in overlapping windows (stride `stride`): each token once, with up to
window - stride tokens of left context, the usual strided perplexity. `window` should be the
sequence length the model was trained at (rotary positions beyond it were never seen).

A tokenizer that does not reproduce a document (sentencepiece's default normalization turns a
newline into a space) is still scored on the original bytes; `lossless_documents` counts the
documents whose tokens decode back to them exactly, so a lossy tokenizer's figure is not mistaken
for a comparable one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

PREFIX = 2   # <bos> <begin_text>: given, not scored


@dataclass
class BitsPerByte:
    documents: int
    lossless_documents: int
    bytes: int
    tokens: int            # scored tokens (the text's tokens + <end_text> <eos> per document)
    nats: float
    bits_per_byte: float
    bits_per_token: float
    tokens_per_byte: float
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sequence_nats(model, ids: torch.Tensor, start: int, window: int, stride: int,
                  modality_table: torch.Tensor | None = None) -> float:
    """Sum of -ln p(ids[t] | ids[b:t]) over t in [start, len(ids)), where b is the start of the
    window that scores t: windows [b, b + window) at b = 0, stride, 2 * stride, ... each score the
    tokens the previous windows did not. modality_table (Vocab.modality_table): id -> modality index,
    which a modality-sparse model (cfg.groups > 1) needs beside the ids."""
    if ids.dim() != 1:
        raise ValueError(f"sequence_nats: argument 'ids' must be 1-D, got shape {tuple(ids.shape)}")
    if not 1 <= start:
        raise ValueError(f"sequence_nats: argument 'start' must be >= 1 (the first token has no context), got {start}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"sequence_nats: argument 'stride' must be in [1, window - 1 = {window - 1}], got {stride}")
    n = ids.numel()
    total, done = 0.0, start          # done: the first target position not yet scored
    b = 0
    while done < n:
        e = min(b + window, n)
        if e > done:
            win = ids[b:e].unsqueeze(0)
            mods = modality_table[win] if modality_table is not None else None
            logits = model(win, modality_ids=mods)[0].float()          # logits[i] predicts ids[b + i + 1]
            targets = ids[done:e]
            rows = logits[done - b - 1:e - b - 1]
            total += float(F.cross_entropy(rows, targets, reduction="sum"))
            done = e
        b += stride
    return total


def text_bits_per_byte(model, vocab, tokenizer, texts: list[str], window: int, stride: int | None = None,
                       device: str | torch.device = "cpu") -> BitsPerByte:
    """BitsPerByte of `model` (an mmfm Transformer) on `texts` encoded by `tokenizer` (the export's
    text tokenizer) into `vocab` (its unified vocabulary). stride defaults to window // 2."""
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("text_bits_per_byte: argument 'texts' holds no non-empty text")
    if window < 2:
        raise ValueError(f"text_bits_per_byte: argument 'window' must be >= 2, got {window}")
    stride = window // 2 if stride is None else stride
    model = model.to(device).eval()
    table = vocab.modality_table(device) if model.cfg.groups > 1 else None
    nats, n_bytes, n_tokens, lossless = 0.0, 0, 0, 0
    for text in texts:
        local = tokenizer.encode(text)
        lossless += int(tokenizer.decode(local) == text)
        ids, _ = vocab.encode_sample([("text", local)])
        nats += sequence_nats(model, ids.to(device), PREFIX, window, stride, table)
        n_tokens += ids.numel() - PREFIX
        n_bytes += len(text.encode("utf-8"))
    return BitsPerByte(documents=len(texts), lossless_documents=lossless, bytes=n_bytes, tokens=n_tokens, nats=nats,
                       bits_per_byte=nats / math.log(2) / n_bytes, bits_per_token=nats / math.log(2) / n_tokens,
                       tokens_per_byte=n_tokens / n_bytes, window=window, stride=stride)


def held_out_documents(corpus: str, holdout_fraction: float = 0.1) -> list[str]:
    """The held-out text documents of a demo corpus (text-*.tar; held out by key hash, as the
    tokenizers and the token shards split them)."""
    import glob
    import os

    from mmfm.tokenizers.data import read_samples

    pattern = os.path.join(corpus, "text-*.tar")
    if not glob.glob(pattern):
        raise FileNotFoundError(f"--corpus {corpus!r}: no text-*.tar shards (a demo corpus: mmfm data demo)")
    texts = [s["txt"] for s in read_samples(pattern, "text", "eval", holdout_fraction) if isinstance(s.get("txt"), str)]
    if not texts:
        raise ValueError(f"--corpus {corpus!r}: no held-out text document (holdout_fraction {holdout_fraction})")
    return texts


def export_bits_per_byte(folder: str, texts: list[str], window: int | None = None, stride: int | None = None,
                         device: str = "cpu") -> BitsPerByte:
    """text_bits_per_byte of an `mmfm export` folder (its model, vocab.json and tokenizers/text);
    window defaults to the model's max_seq_len."""
    from mmfm.generate import Bundle

    bundle = Bundle.load(folder)
    if "text" not in bundle.vocab.ranges:
        raise ValueError(f"--model {folder!r}: its vocabulary has no text range")
    window = bundle.model.cfg.max_seq_len if window is None else window
    return text_bits_per_byte(bundle.model, bundle.vocab, bundle.tokenizers["text"], texts, window, stride, device)
