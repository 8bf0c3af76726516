"""Decoding through a KVCache with an optional coprocessor: the path `mmfm generate --coprocessor DIR`
uses, and the one the eval scores with.

    logits = prefill(decoder, prompts, cache)          # ragged prompts, next-token logits per row
    aug = augment(decoder, coprocessor, cache)         # N latents appended (mmfm/cache/coprocessor.py)
    logits = aug if aug is not None else logits

With coprocessor=None every function here is the decoder's plain cached forward, call for call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.cache.coprocessor import Coprocessor, augment
from mmfm.models import KVCache, Transformer


def _pad(prompts: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-d id tensors")
    lens = torch.tensor([p.numel() for p in prompts], dtype=torch.long, device=device)
    ids = torch.full((len(prompts), int(lens.max())), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :p.numel()] = p.to(device)
    return ids, lens


def _groups(table, ids):
    return None if table is None else table.to(ids.device)[ids]


@torch.no_grad()
def prefill(decoder: Transformer, prompts: list[torch.Tensor], cache: KVCache, pad_id: int = 0, table=None) -> torch.Tensor:
    """Runs ragged prompts into an empty cache; returns each row's next-token logits [B, V].
    table: the vocabulary's modality table (mmfm.objectives.modality_table), for modality-sparse decoders."""
    ids, lens = _pad(prompts, pad_id, cache.lengths.device)
    logits = decoder(ids, _groups(table, ids), cache=cache, counts=lens)
    return logits[torch.arange(len(prompts), device=ids.device), lens - 1]


@torch.no_grad()
def cached_ahead_nll(decoder: Transformer, coprocessor: Coprocessor | None, prompts: list[torch.Tensor],
                     targets: torch.Tensor, pad_id: int = 0, table=None) -> torch.Tensor:
    """nll [R, A] of targets[r] following prompts[r], the prompt's cache augmented at its end (the
    generation path: KVCache, ragged prefill, augment, then teacher-forced decoding)."""
    R, A = targets.shape
    N = 0 if coprocessor is None else coprocessor.num_latents
    dev = next(decoder.parameters()).device
    targets = targets.to(dev)
    cache = KVCache.for_model(decoder, R, max(p.numel() for p in prompts) + N + A)
    first = prefill(decoder, prompts, cache, pad_id, table)
    aug = augment(decoder, coprocessor, cache)
    first = first if aug is None else aug
    logits = first[:, None]
    if A > 1:
        rest = decoder(targets[:, :-1], _groups(table, targets[:, :-1]), cache=cache)
        logits = torch.cat([logits, rest], dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none").view(R, A)


@torch.no_grad()
def generate(decoder: Transformer, prompts: list[torch.Tensor], max_new_tokens: int,
             coprocessor: Coprocessor | None = None, every: int = 0, temperature: float = 0.0,
             eos_id: int | None = None, pad_id: int = 0, generator: torch.Generator | None = None,
             table=None) -> list[torch.Tensor]:
    """New ids per prompt. The cache is augmented at the prompt's end and, with every=M > 0, again
    after each M generated tokens; temperature 0 is greedy. Rows stop at eos_id (kept in the output).
    A plain function: `mmfm generate --coprocessor DIR` wraps its own sampler around prefill/augment."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if every < 0:
        raise ValueError(f"generate: every must be >= 0 (0 = augment at the prompt's end only), got {every}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    N = 0 if coprocessor is None else coprocessor.num_latents
    augments = 1 + ((max_new_tokens - 1) // every if every else 0)
    dev = next(decoder.parameters()).device
    cap = max(p.numel() for p in prompts) + max_new_tokens + N * augments
    cache = KVCache.for_model(decoder, len(prompts), cap)
    logits = prefill(decoder, prompts, cache, pad_id, table)
    out = torch.zeros(len(prompts), 0, dtype=torch.long, device=dev)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        if t == 0 or (every and t % every == 0):
            aug = augment(decoder, coprocessor, cache)
            logits = logits if aug is None else aug
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
        if t + 1 < max_new_tokens:
            logits = decoder(nxt[:, None], _groups(table, nxt[:, None]), cache=cache)[:, -1]
    return [row[: int((row == eos_id).nonzero()[0]) + 1] if eos_id is not None and bool((row == eos_id).any()) else row
            for row in out]
