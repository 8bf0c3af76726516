"""Inputs of masked editing (`mmfm generate --decode masked --edit INPUT --edit-mask SPEC`): the
token block to edit and which of its positions to regenerate.

INPUT (edit_tokens) is a file of the generated modality, read and tokenized like a prompt input
(`--image IN.png`: outputs.read_input, then the tokenizer), or a token file: `.json` (a list of
ints) or `.npy` (an integer array) of that modality's tokenizer-local ids. Neither suffix is a
sample format of any modality, so the two cannot be confused. Either way the block must have the
segment's length (the tokenizer's tokens_per_sample), since the model was trained on whole segments.

SPEC (parse_edit_mask) names token positions of the block: comma-separated items, each an index
`I` or a half-open span `A:B` (A or B left out: the block's start or end); negative numbers count
from the end, as in Python. `0:16` regenerates the first 16 tokens, `-8:` the last 8, `3,5,40:48`
two tokens and a span. For the demo image tokenizer (a 1D tokenizer: 64 tokens, none tied to a
place in the image) a span is a set of latent tokens, not a region.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

TOKEN_SUFFIXES = (".json", ".npy")


def parse_edit_mask(spec, length: int, where: str = "edit_mask") -> torch.Tensor:
    """SPEC (see the module docstring) or a bool tensor [length] -> bool [length], True =
    regenerate. Errors name `where` and say what is expected."""
    if isinstance(spec, torch.Tensor):
        if spec.dtype != torch.bool or tuple(spec.shape) != (length,):
            raise ValueError(f"{where}: expected a bool tensor of shape [{length}] (True = regenerate), got "
                             f"{spec.dtype} {tuple(spec.shape)}")
        if not bool(spec.any()):
            raise ValueError(f"{where}: selects no position; nothing would be regenerated")
        return spec.clone()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: expected positions such as '0:16' or '3,5,40:48' (of {length} tokens), "
                         f"got {spec!r}")
    mask = torch.zeros(length, dtype=torch.bool)
    for item in spec.split(","):
        item = item.strip()
        try:
            if ":" in item:
                a, b = item.split(":")
                lo = _index(a, 0, length)
                hi = _index(b, length, length)
            else:
                lo = _index(item, None, length)
                hi = lo + 1
        except ValueError:
            raise ValueError(f"{where}: {item!r} in {spec!r} is not an index I or a span A:B (integers; "
                             f"negative counts from the end)") from None
        if not (0 <= lo < hi <= length):
            raise ValueError(f"{where}: {item!r} in {spec!r} selects no position of the {length}-token block "
                             f"(positions 0..{length - 1}; a span A:B needs A < B)")
        mask[lo:hi] = True
    return mask


def _index(text: str, default, length: int) -> int:
    text = text.strip()
    if not text:
        if default is None:
            raise ValueError(text)
        return default
    i = int(text)
    return i + length if i < 0 else i


def edit_tokens(value, modality: str, tokenizers, length: int, where: str = "edit") -> torch.Tensor:
    """The block to edit as tokenizer-local ids [length]: from a file (the modality's format, or a
    .json / .npy token file) or a tensor of local ids. Errors name `where`."""
    if modality == "text":
        raise ValueError(f"{where}: editing takes an image, audio, video, 3D or physics block (a fixed-length "
                         "segment), not text")
    if isinstance(value, (str, os.PathLike)):
        path = str(value)
        ext = os.path.splitext(path)[1].lower()
        if ext in TOKEN_SUFFIXES:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{where}: {path}: no such file")
            try:
                if ext == ".json":
                    with open(path, encoding="utf-8") as f:
                        arr = np.asarray(json.load(f))
                else:
                    arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{where}: {path}: not a token file ({exc})") from None
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{where}: {path}: expected integer token ids, got {arr.dtype} values")
            ids = torch.from_numpy(arr.astype(np.int64).reshape(-1))
        else:
            from mmfm.generate.prompt import encode_input

            try:
                ids = encode_input(tokenizers, modality, path).reshape(-1).long().cpu()
            except (ValueError, FileNotFoundError) as exc:
                raise type(exc)(f"{where}: {exc} (or give a token file: {' or '.join(TOKEN_SUFFIXES)})") from None
    else:
        ids = torch.as_tensor(value)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{where}: expected integer token ids, got {ids.dtype}")
        ids = ids.reshape(-1).long().cpu()
    size = tokenizers.vocab.ranges[modality].size
    if ids.numel() != length:
        raise ValueError(f"{where}: the {modality} block has {ids.numel()} tokens; the segment has {length} "
                         "(the tokenizer's tokens_per_sample)")
    if int(ids.min()) < 0 or int(ids.max()) >= size:
        raise ValueError(f"{where}: token ids must be the {modality} tokenizer's local ids in [0, {size})")
    return ids
