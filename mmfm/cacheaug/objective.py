"""The training objective: the frozen decoder's next-token loss on the `ahead` tokens after each
augmentation point, given the prefix's cache plus the coprocessor's latents.

One forward serves many (sequence, point) rows: the decoder runs each packed sequence once
(no grad) to get its keys/values; row r = (sequence b, point p) reads slots [0, p) of b (x_0 ..
x_{p-1}) through a PrefixCache, the coprocessor adds N soft tokens there, and the decoder runs the
N latents (all at position p) and then x_p .. x_{p+A-1} at their own positions, whose logits score
x_{p+1} .. x_{p+A} (the convention of mmfm/cacheaug/coprocessor.py). Gradients reach the coprocessor only
through the decoder's forward over the latents: the decoder's own parameters have requires_grad
False and the prefix keys/values are constants.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.cacheaug.coprocessor import Coprocessor, PrefixCache
from mmfm.models import KVCache, Transformer


@torch.no_grad()
def prefix_pass(decoder: Transformer, ids: torch.Tensor, modality_ids=None):
    """(k, v [n_layers, B, Hkv, S, D]) of the decoder over whole sequences (return_hidden: the
    output head's logits are not needed)."""
    cache = KVCache.for_model(decoder, ids.shape[0], ids.shape[1])
    decoder(ids, modality_ids, cache=cache, return_hidden=True)
    return cache.k, cache.v


def choose_points(ids: torch.Tensor, valid: torch.Tensor, table: torch.Tensor, *, points: int, ahead: int,
                  min_prefix: int, groups: list[int] | None, generator: torch.Generator):
    """(rows, positions) [R]: up to `points` distinct positions p per sequence, drawn uniformly among
    those with p >= min_prefix whose fed and scored tokens ids[p : p+ahead+1] are all real (valid)
    and, when `groups` is given, of those modality groups."""
    B, S = ids.shape
    ok = valid.bool()
    if groups:
        ok = ok & torch.isin(table[ids], torch.tensor(groups, dtype=torch.long))
    win = ok.unfold(1, ahead + 1, 1).all(-1)             # [B, S - ahead]: window at p is all ok
    win[:, :min_prefix] = False
    rows, pos = [], []
    for b in range(B):
        cand = win[b].nonzero().flatten()
        if cand.numel() == 0:
            continue
        pick = cand[torch.randperm(cand.numel(), generator=generator)[:points]].sort().values
        rows.append(torch.full_like(pick, b))
        pos.append(pick)
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(rows), torch.cat(pos)


def ahead_nll(decoder: Transformer, coprocessor: Coprocessor | None, ids: torch.Tensor, rows: torch.Tensor,
              points: torch.Tensor, ahead: int, kv=None, modality_ids=None) -> torch.Tensor:
    """nll [R, ahead] of the decoder on ids[rows[r], points[r] + 1 : points[r] + 1 + ahead]: the cache
    holds the prefix ids[rows[r], :points[r]] plus the coprocessor's latents (None or N = 0: none),
    and the decoder is fed x_p .. x_{p+ahead-1} after them."""
    k, v = kv if kv is not None else prefix_pass(decoder, ids, modality_ids)
    dev = ids.device
    R = rows.numel()
    N = 0 if coprocessor is None else coprocessor.num_latents
    span = torch.arange(ahead + 1, device=dev)
    seq = ids[rows[:, None], points[:, None] + span[None, :]]               # [R, A + 1]: x_p .. x_{p+A}
    pieces, groups = [], []
    if N:
        pos_lat = points[:, None].expand(R, N)         # every latent at the augmentation point
        pieces.append(coprocessor(PrefixCache(k[:, rows], v[:, rows], points), pos_lat))
        groups.append(coprocessor.group_ids(R, N, dev))
    pieces.append(decoder.embed_tokens(seq[:, :-1]))
    if modality_ids is not None:
        groups.append(modality_ids[rows[:, None], points[:, None] + span[None, :-1]])
    x = torch.cat(pieces, dim=1)
    group_ids = None if decoder.cfg.groups == 1 else torch.cat(groups, dim=1)
    pos = points[:, None] + torch.arange(ahead, device=dev)[None, :]    # x_p .. at their own positions
    if N:
        pos = torch.cat([points[:, None].expand(R, N), pos], dim=1)
    logits = decoder(None, group_ids, positions=pos, cache=PrefixCache(k[:, rows], v[:, rows], points),
                     inputs_embeds=x)[:, N:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq[:, 1:].reshape(-1),
                           reduction="none").view(R, ahead)


class AugmentedDecoder(nn.Module):
    """The module DeepSpeed wraps: the trainable coprocessor and the frozen decoder (requires_grad
    False, so it has no optimizer state and no gradients, but sits in the graph between the latents
    and the loss). forward(ids, rows, points) -> (nll [R, ahead], plain nll [R, ahead]): the plain
    decoder's nll on the same tokens (no grad, sharing the prefix pass) is what the log compares
    against, since one batch's loss alone says little about whether the latents help."""

    def __init__(self, decoder: Transformer, coprocessor: Coprocessor, ahead: int):
        super().__init__()
        self.decoder = decoder
        self.coprocessor = coprocessor
        self.ahead = ahead
        for p in self.decoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.decoder.eval()   # frozen: no dropout-like behaviour may change between train and eval
        return self

    def forward(self, ids, rows, points, modality_ids=None):
        kv = prefix_pass(self.decoder, ids, modality_ids)
        with torch.no_grad():
            plain = ahead_nll(self.decoder, None, ids, rows, points, self.ahead, kv, modality_ids)
        return ahead_nll(self.decoder, self.coprocessor, ids, rows, points, self.ahead, kv, modality_ids), plain
