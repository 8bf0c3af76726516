"""The modality state machine of constrained decoding, as per-row tensors.

Each row decodes one segment of a target modality:

  * a tokenized modality M (image, audio, ...): exactly `length` tokens from M's id range, then
    `<end_M>` (forced), then the row is done;
  * text: tokens from the text range until `<end_text>` or `<eos>` (or another stop id), at most
    `length` tokens.

A finished row keeps emitting `<eos>` (its tokens are dropped) so the batch can go on in lock
step. Everything is kept in small device tensors and updated with a few elementwise ops per step:
the loop needs no host round trip to know what each row may emit next, so `allowed_range` for the
fused sampler is ready before the forward pass finishes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfm.vocab import Vocab


@dataclass(frozen=True)
class Target:
    """What one row must produce: `modality` ('text' or a tokenized modality of the vocabulary) and
    `length` (the exact token count of a modality segment; the maximum for text)."""
    modality: str
    length: int


def text_allowed_mask(vocab: Vocab, device="cpu") -> torch.Tensor:
    """bool [V]: what a text row may emit: text ids, `<end_text>` or `<eos>`."""
    mask = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    r = vocab.ranges["text"]
    mask[r.start:r.stop] = True
    mask[[vocab.end_id("text"), vocab.eos_id]] = True
    return mask


class Constraints:
    """Per-row allowed tokens for `mmfm.ops.sample`, advanced with `update(tokens)`.

    allowed_range(): int64 [B, 2] (lo, hi) of each row for this step; text rows also need
    `allowed_mask` (text ids + `<end_text>` + `<eos>`; None when no row is a text row).
    """

    def __init__(self, vocab: Vocab, targets: list[Target], device="cpu", stop_ids=()):
        if not targets:
            raise ValueError("Constraints: argument 'targets' is empty; give one Target per row")
        B, V = len(targets), vocab.size
        lo, hi, end, left, is_text = [], [], [], [], []
        for i, t in enumerate(targets):
            if t.modality not in vocab.ranges:
                raise ValueError(f"Constraints: targets[{i}].modality is {t.modality!r}; expected one of "
                                 f"{list(vocab.ranges)}")
            if isinstance(t.length, bool) or not isinstance(t.length, int) or t.length < 1:
                raise ValueError(f"Constraints: targets[{i}].length must be an integer >= 1, got {t.length!r}")
            r = vocab.ranges[t.modality]
            text = t.modality == "text"
            # text rows take the full id range here and are narrowed by the mask
            lo.append(0 if text else r.start)
            hi.append(V if text else r.stop)
            end.append(vocab.end_id(t.modality))
            left.append(t.length)
            is_text.append(text)
        bad = [int(x) for x in stop_ids if not 0 <= int(x) < V]
        if bad:
            raise ValueError(f"Constraints: argument 'stop_ids' holds {bad[:3]}, outside the vocabulary [0, {V})")
        as_long = dict(dtype=torch.long, device=device)
        self.vocab, self.targets = vocab, list(targets)
        self.body_lo, self.body_hi = torch.tensor(lo, **as_long), torch.tensor(hi, **as_long)
        self.end = torch.tensor(end, **as_long)
        self.left = torch.tensor(left, **as_long)
        self.is_text = torch.tensor(is_text, dtype=torch.bool, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.eos = vocab.eos_id
        self.stop_ids = torch.tensor(sorted({int(s) for s in stop_ids}), **as_long)
        self.any_text = any(is_text)
        self._mask = None
        if self.any_text:
            text_mask = text_allowed_mask(vocab, device)
            # non-text rows are narrowed by their range alone: an all-True mask row
            self._mask = torch.where(self.is_text[:, None], text_mask[None, :], torch.ones_like(text_mask)[None, :])
        self._range = torch.empty(B, 2, **as_long)
        self.refresh()

    @property
    def batch(self) -> int:
        return self.done.shape[0]

    def refresh(self) -> None:
        """Recompute this step's ranges from the state (after update)."""
        body = (self.left > 0) & ~self.done
        forced = torch.where(self.done, torch.full_like(self.end, self.eos), self.end)
        torch.where(body, self.body_lo, forced, out=self._range[:, 0])
        torch.where(body, self.body_hi, forced + 1, out=self._range[:, 1])

    def allowed_range(self) -> torch.Tensor:
        return self._range

    def allowed_mask(self) -> torch.Tensor | None:
        return self._mask

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record this step's tokens [B]; returns `emitted` [B] bool: which rows' tokens are real
        output (False for rows that had already finished)."""
        emitted = ~self.done
        self.left -= emitted.long()
        stop = (tokens == self.end) | (self.is_text & ((tokens == self.eos) | (self.left <= 0)))
        if self.stop_ids.numel():
            stop |= torch.isin(tokens, self.stop_ids)
        self.done |= emitted & stop
        self.refresh()
        return emitted

    def all_done(self) -> bool:
        return bool(self.done.all())
