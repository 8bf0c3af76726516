"""Decoding through a KVCache with an optional coprocessor: the path `mmfm generate --coprocessor DIR`
uses, and the one the eval scores with.

    prefill(decoder, [p[:-1] for p in prompts], cache)   # ragged; all but each prompt's last token
    offset = augment(decoder, coprocessor, cache)        # N latents appended (mmfm/cacheaug/coprocessor.py)
    logits = decoder(last[:, None], cache=cache,         # then decode as usual, tokens at their own
                     positions=(cache.lengths - offset)[:, None])   # positions (latents take none)

With coprocessor=None every function here is the decoder's plain cached forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.cacheaug.coprocessor import Coprocessor, augment
from mmfm.models import KVCache, Transformer


def _pad(prompts: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(not isinstance(p, torch.Tensor) or p.dim() != 1 for p in prompts):
        raise ValueError("prompts must be a non-empty list of 1-d id tensors")
    lens = torch.tensor([p.numel() for p in prompts], dtype=torch.long, device=device)
    ids = torch.full((len(prompts), max(1, int(lens.max()))), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :p.numel()] = p.to(device)
    return ids, lens


def _groups(table, ids):
    return None if table is None else table.to(ids.device)[ids]


@torch.no_grad()
def prefill(decoder: Transformer, prompts: list[torch.Tensor], cache: KVCache, pad_id: int = 0, table=None) -> None:
    """Runs ragged prompts (empty ones allowed) into an empty cache.
    table: the vocabulary's modality table (Vocab.modality_table()), for modality-sparse decoders."""
    ids, lens = _pad(prompts, pad_id, cache.lengths.device)
    if int(lens.max()) > 0:
        decoder(ids, _groups(table, ids), cache=cache, counts=lens, return_hidden=True)


def clone_cache(cache: KVCache) -> KVCache:
    """An independent copy (to augment one prefill in several ways)."""
    c = KVCache.__new__(KVCache)
    c.k, c.v, c.lengths, c.capacity = cache.k.clone(), cache.v.clone(), cache.lengths.clone(), cache.capacity
    return c


@torch.no_grad()
def cached_ahead_nll_many(decoder: Transformer, coprocessors: list, prefixes: list[torch.Tensor],
                          continuations: torch.Tensor, pad_id: int = 0, table=None) -> list[torch.Tensor]:
    """[nll [R, A] for each entry of coprocessors (None = plain)]: the cache holds prefixes[r] plus
    the latents, the decoder is fed continuations[r, :-1] and scored on continuations[r, 1:]
    (the generation path: ragged prefill into a KVCache, augment, teacher-forced decoding). One
    prefill serves every entry."""
    R, A1 = continuations.shape
    if A1 < 2:
        raise ValueError("continuations must hold at least 2 tokens per row (one fed, one scored)")
    n_max = max([0] + [c.num_latents for c in coprocessors if c is not None])
    dev = next(decoder.parameters()).device
    cont = continuations.to(dev)
    base = KVCache.for_model(decoder, R, max(p.numel() for p in prefixes) + n_max + A1)
    prefill(decoder, prefixes, base, pad_id, table)
    pos = base.lengths[:, None] + torch.arange(A1 - 1, device=dev)[None, :]
    out = []
    for i, c in enumerate(coprocessors):
        cache = base if i == len(coprocessors) - 1 else clone_cache(base)
        augment(decoder, c, cache)
        logits = decoder(cont[:, :-1], _groups(table, cont[:, :-1]), positions=pos, cache=cache)
        out.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), cont[:, 1:].reshape(-1),
                                   reduction="none").view(R, A1 - 1))
    return out


def cached_ahead_nll(decoder: Transformer, coprocessor: Coprocessor | None, prefixes: list[torch.Tensor],
                     continuations: torch.Tensor, pad_id: int = 0, table=None) -> torch.Tensor:
    """cached_ahead_nll_many for one coprocessor (or None)."""
    return cached_ahead_nll_many(decoder, [coprocessor], prefixes, continuations, pad_id, table)[0]


@torch.no_grad()
def generate(decoder: Transformer, prompts: list[torch.Tensor], max_new_tokens: int,
             coprocessor: Coprocessor | None = None, every: int = 0, temperature: float = 0.0,
             eos_id: int | None = None, pad_id: int = 0, generator: torch.Generator | None = None,
             table=None) -> list[torch.Tensor]:
    """New ids per prompt. The cache is augmented at the prompt's end (before its last token is fed)
    and, with every=M > 0, again after each M generated tokens (before the M-th is fed); temperature
    0 is greedy. Rows stop at eos_id (kept in the output).
    A plain function: `mmfm generate --coprocessor DIR` wraps its own sampler around prefill/augment."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if every < 0:
        raise ValueError(f"generate: every must be >= 0 (0 = augment at the prompt's end only), got {every}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty 1-d id tensors")
    N = 0 if coprocessor is None else coprocessor.num_latents
    augments = 1 + ((max_new_tokens - 1) // every if every else 0)
    dev = next(decoder.parameters()).device
    cap = max(p.numel() for p in prompts) + max_new_tokens + N * augments
    cache = KVCache.for_model(decoder, len(prompts), cap)
    prefill(decoder, [p[:-1] for p in prompts], cache, pad_id, table)
    pending = torch.stack([p[-1] for p in prompts]).to(dev)
    out = torch.zeros(len(prompts), 0, dtype=torch.long, device=dev)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    latent_slots = 0    # cache slots holding latents: a token's position is its slot minus these
    for t in range(max_new_tokens):
        if t == 0 or (every and t % every == 0):
            latent_slots += augment(decoder, coprocessor, cache, cache.lengths - latent_slots)
        logits = decoder(pending[:, None], _groups(table, pending[:, None]), cache=cache,
                         positions=(cache.lengths - latent_slots)[:, None])[:, -1]
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
        pending = nxt
    return [row[: int((row == eos_id).nonzero()[0]) + 1] if eos_id is not None and bool((row == eos_id).any()) else row
            for row in out]
