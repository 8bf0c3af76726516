"""Masked parallel decoding for models trained with the masked (4M) objective, whose attention
is bidirectional: MaskGIT-style iterative decoding and its ReCAP variant.

MaskGIT (maskgit_decode): the `length` positions after a prefix start as <mask>. Each step runs the
model over the whole sequence, samples a token for every masked position (the fused sample op,
with allowed_range for the modality's id range), and keeps the most confident ones so that
ceil(length * cos(pi/2 * (step + 1) / steps)) stay masked (the cosine schedule); the rest are
re-masked. Confidence is the log-probability of the sampled token plus Gumbel noise scaled by
choice_temperature * (1 - (step + 1) / steps), as in MaskGIT, so early choices are not all greedy.

ReCAP (recap_decode): the same schedule, but only every `full_every`-th step is a full pass. A
full pass also stores the keys/values of the context (the tokens already decoded at that point:
prefix, suffix and fixed positions) in a KVCache; the cheap steps until the next full pass
evaluate only the positions that were masked at the full pass (their current ids: newly decoded
tokens or <mask>), attending to the stored context features instead of recomputing them. A cheap
step right after a full pass therefore reproduces that pass's logits exactly; later cheap steps
approximate them, since the context features do not see the newly decoded tokens.

BAMM cascade (cascade_decode): a causal draft, then MaskGIT editing of its least confident tokens
under the hybrid objective's attention (causal prefix, bidirectional block).

Both return (tokens int64 [B, length], MaskedStats) with the number of full and cheap passes and
the token evaluations (sum of query tokens over passes), the compute a pass costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmfm.generate.decode import modality_ids
from mmfm.models.kv_cache import KVCache
from mmfm.ops import sampling


@dataclass
class MaskedStats:
    steps: int = 0
    full_passes: int = 0
    cheap_passes: int = 0
    token_evals: int = 0      # query tokens evaluated, summed over passes

    def as_dict(self) -> dict:
        return {"steps": self.steps, "full_passes": self.full_passes, "cheap_passes": self.cheap_passes,
                "token_evals": self.token_evals}


def masked_after(step: int, steps: int, length: int) -> int:
    """How many positions stay masked after `step` (0-based) of `steps`: the cosine schedule,
    at least one fewer than before the step, and none after the last."""
    if step >= steps - 1:
        return 0
    n = math.ceil(length * math.cos(math.pi / 2 * (step + 1) / steps))
    before = length if step == 0 else masked_after(step - 1, steps, length)
    return max(0, min(n, before - 1))


def _check(model, prefix_ids, length, steps, mask_id, suffix_ids):
    V = model.cfg.vocab_size
    device = next(model.parameters()).device
    pre = torch.as_tensor(prefix_ids, dtype=torch.long, device=device)
    if pre.dim() == 1:
        pre = pre[None]
    if pre.dim() != 2:
        raise ValueError(f"prefix_ids: expected [P] or [B, P] token ids, got shape {tuple(pre.shape)}")
    suf = torch.zeros(pre.shape[0], 0, dtype=torch.long, device=device) if suffix_ids is None else \
        torch.as_tensor(suffix_ids, dtype=torch.long, device=device)
    if suf.dim() == 1:
        suf = suf[None].expand(pre.shape[0], -1)
    if suf.dim() != 2 or suf.shape[0] != pre.shape[0]:
        raise ValueError(f"suffix_ids: expected [S] or [B={pre.shape[0]}, S] token ids, got shape {tuple(suf.shape)}")
    for name, t in (("prefix_ids", pre), ("suffix_ids", suf)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
            raise ValueError(f"{name}: token ids must lie in [0, vocab_size={V})")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected an int >= 1 (positions to generate), got {length!r}")
    if not isinstance(steps, int) or not 1 <= steps <= length:
        raise ValueError(f"steps: expected an int in [1, length={length}], got {steps!r}")
    if not isinstance(mask_id, int) or not 0 <= mask_id < V:
        raise ValueError(f"mask_id: expected the vocabulary's <mask> id in [0, {V}), got {mask_id!r}")
    if pre.shape[1] + length + suf.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"length: prefix + length + suffix = {pre.shape[1] + length + suf.shape[1]} exceeds the "
                         f"model's max_seq_len {model.cfg.max_seq_len}")
    return pre, suf


def _check_edit(block_ids, edit_mask, pre, length: int, steps: int, V: int):
    """(block [B, length], edit mask [B, length]) for editing, or None without block_ids."""
    if block_ids is None and edit_mask is None:
        return None
    if block_ids is None or edit_mask is None:
        raise ValueError("block_ids and edit_mask: editing needs both (the tokens, and which of them to regenerate)")
    B = pre.shape[0]
    block = torch.as_tensor(block_ids, dtype=torch.long, device=pre.device)
    where = torch.as_tensor(edit_mask, device=pre.device)
    block = block[None].expand(B, -1) if block.dim() == 1 else block
    where = where[None].expand(B, -1) if where.dim() == 1 else where
    if tuple(block.shape) != (B, length) or tuple(where.shape) != (B, length):
        raise ValueError(f"block_ids and edit_mask: expected [length={length}] or [B={B}, length={length}], got "
                         f"{tuple(block.shape)} and {tuple(where.shape)}")
    if where.dtype != torch.bool:
        raise ValueError(f"edit_mask: expected a bool tensor (True = regenerate), got {where.dtype}")
    if int(block.min()) < 0 or int(block.max()) >= V:
        raise ValueError(f"block_ids: token ids must lie in [0, vocab_size={V})")
    counts = where.sum(1)
    if int(counts.min()) != int(counts.max()) or int(counts[0]) < 1:
        raise ValueError(f"edit_mask: every row must regenerate the same number (>= 1) of positions, got "
                         f"{counts.tolist()}")
    if steps > int(counts[0]):
        raise ValueError(f"steps: expected at most the {int(counts[0])} edited positions, got {steps}")
    return block, where


class _Decoder:
    """The per-step state shared by both decoders: current tokens of the generated block, which
    are still masked, the sampling settings and the randomness."""

    def __init__(self, pre, suf, length, steps, mask_id, settings, allowed_range, choice_temperature, seed,
                 edit=None):
        self.pre, self.suf = pre, suf
        B, P = pre.shape
        self.B, self.P, self.n, self.steps = B, P, length, steps
        self.mask_id = mask_id
        if edit is None:
            self.block = torch.full((B, length), mask_id, dtype=torch.long, device=pre.device)
            self.masked = torch.ones(B, length, dtype=torch.bool, device=pre.device)
        else:   # editing: the given tokens stay (confidence inf below), the edited positions start masked
            block, where = edit
            self.block = torch.where(where, torch.full_like(block, mask_id), block)
            self.masked = where.clone()
        self.todo = int(self.masked[0].sum())   # positions the schedule decodes (the same in every row)
        self.settings, self.allowed_range = settings, allowed_range
        self.choice_temperature = choice_temperature
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self.gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def sequence(self) -> torch.Tensor:
        return torch.cat([self.pre, self.block, self.suf], 1)

    def step(self, t: int, logits: torch.Tensor, where: torch.Tensor) -> None:
        """logits [B, A, V] at block positions where [B, A] (a superset of the masked ones)."""
        B, A, V = logits.shape
        tok, p = sampling.sample(logits.reshape(B * A, V), **self.settings, allowed_range=self.allowed_range,
                                 seed=self.seed, offset=t, return_probs=True)
        tok, p = tok.view(B, A), p.view(B, A)
        conf = torch.full((B, self.n), math.inf, device=logits.device)
        cand = self.block.clone()
        was_masked = self.masked.gather(1, where)
        scale = self.choice_temperature * (1 - (t + 1) / self.steps)
        score = p.clamp_min(1e-30).log()
        if scale > 0:
            u = torch.rand(B, A, generator=self.gen).clamp(1e-20, 1 - 1e-7).to(logits.device)
            score = score + scale * -torch.log(-torch.log(u))
        conf.scatter_(1, where, torch.where(was_masked, score, torch.full_like(score, math.inf)))
        cand.scatter_(1, where, torch.where(was_masked, tok, self.block.gather(1, where)))
        keep_masked = masked_after(t, self.steps, self.todo)
        # the keep_masked least confident positions stay masked; decoded ones have conf inf
        remask = torch.zeros_like(self.masked)
        if keep_masked:
            remask.scatter_(1, conf.topk(keep_masked, dim=1, largest=False).indices, True)
        self.block = torch.where(remask, torch.full_like(cand, self.mask_id), cand)
        self.masked = remask


@torch.no_grad()
def maskgit_decode(model, prefix_ids, length: int, *, mask_id: int, steps: int = 10, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, allowed_range=None, suffix_ids=None,
                   choice_temperature: float = 4.5, seed: int | None = None,
                   modality_table: torch.Tensor | None = None, block_ids=None,
                   edit_mask=None, hybrid: bool = False) -> tuple[torch.Tensor, MaskedStats]:
    """MaskGIT decoding of `length` tokens after prefix_ids ([P] or [B, P]; suffix_ids optional,
    e.g. the modality's end marker); every step is a full bidirectional pass.

    Editing: with block_ids ([length] or [B, length], e.g. a given image's tokens) and edit_mask
    (bool, same shape; the same number of True per row), only the True positions are regenerated,
    starting from <mask>, with the schedule over their count; the others stay as given and are
    seen as context from the first step.

    hybrid: the attention a hybrid (BAMM) model was trained with, causal over the prefix and
    bidirectional over the block and what follows it (hybrid_mask), instead of full attention."""
    pre, suf = _check(model, prefix_ids, length, steps, mask_id, suffix_ids)
    edit = _check_edit(block_ids, edit_mask, pre, length, steps, model.cfg.vocab_size)
    dec = _Decoder(pre, suf, length, steps, mask_id, dict(temperature=temperature, top_k=top_k, top_p=top_p),
                   allowed_range, choice_temperature, seed, edit)
    stats = MaskedStats(steps=steps)
    B, P = pre.shape
    L = P + length + suf.shape[1]
    full = hybrid_mask(P, L, pre.device).expand(B, L, L) if hybrid else \
        torch.ones(B, L, L, dtype=torch.bool, device=pre.device)
    block_pos = torch.arange(length, device=pre.device).expand(B, -1)
    for t in range(steps):
        seq = dec.sequence()
        logits = model(seq, modality_ids=modality_ids(model, seq, modality_table), attn_mask=full)[:, P:P + length]
        stats.full_passes += 1
        stats.token_evals += B * L
        dec.step(t, logits, block_pos)
    return dec.block, stats


def hybrid_mask(P: int, L: int, device=None) -> torch.Tensor:
    """[1, L, L] bool: the hybrid objective's attention with its masked block starting at P: causal
    everywhere, and bidirectional among the positions >= P."""
    pos = torch.arange(L, device=device)
    block = pos >= P
    return (torch.ones(L, L, dtype=torch.bool, device=device).tril() | (block[:, None] & block[None, :]))[None]


@torch.no_grad()
def cascade_decode(model, prefix_ids, length: int, *, mask_id: int, refine: float = 0.3, steps: int = 4,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, allowed_range=None,
                   suffix_ids=None, choice_temperature: float = 4.5, seed: int | None = None,
                   modality_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, MaskedStats]:
    """BAMM's cascaded inference for a hybrid-trained model: a causal draft of the `length` tokens
    (KV-cached, token by token), then the round(refine * length) draft tokens the causal pass was
    least sure of (lowest probability of the drawn token) re-masked and regenerated by MaskGIT
    editing under the hybrid attention, the other draft tokens kept as context. Returns (tokens
    [B, length], the causal draft [B, length], stats: full_passes counts the refinement passes,
    token_evals the draft's tokens too). refine = 0 returns the draft."""
    pre, suf = _check(model, prefix_ids, length, 1, mask_id, suffix_ids)
    if not isinstance(refine, (int, float)) or not 0 <= refine <= 1:
        raise ValueError(f"refine: expected the share of draft tokens to regenerate, in [0, 1], got {refine!r}")
    B, P = pre.shape
    seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
    cache = KVCache.for_model(model, batch=B, capacity=P + length)
    last = model(pre, modality_ids=modality_ids(model, pre, modality_table), cache=cache)[:, -1]
    draft = torch.empty(B, length, dtype=torch.long, device=pre.device)
    conf = torch.empty(B, length, device=pre.device)
    for i in range(length):
        tok, p = sampling.sample(last, temperature=temperature, top_k=top_k, top_p=top_p,
                                 allowed_range=allowed_range, seed=seed, offset=i, return_probs=True)
        draft[:, i], conf[:, i] = tok, p
        if i + 1 < length:
            f = tok[:, None]
            last = model(f, modality_ids=modality_ids(model, f, modality_table), cache=cache)[:, -1]
    stats = MaskedStats(steps=0, token_evals=B * (P + length - 1))
    k = int(round(refine * length))
    if k == 0:
        return draft, draft.clone(), stats
    where = torch.zeros(B, length, dtype=torch.bool, device=pre.device)
    where.scatter_(1, conf.topk(k, dim=1, largest=False).indices, True)
    out, st = maskgit_decode(model, pre, length, mask_id=mask_id, steps=min(steps, k), temperature=temperature,
                             top_k=top_k, top_p=top_p, allowed_range=allowed_range, suffix_ids=suf,
                             choice_temperature=choice_temperature, seed=seed + 1, modality_table=modality_table,
                             block_ids=draft, edit_mask=where, hybrid=True)
    stats.steps, stats.full_passes = st.steps, st.full_passes
    stats.token_evals += st.token_evals
    return out, draft, stats


@torch.no_grad()
def recap_decode(model, prefix_ids, length: int, *, mask_id: int, steps: int = 16, full_every: int = 2,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, allowed_range=None, suffix_ids=None,
                 choice_temperature: float = 4.5, seed: int | None = None,
                 modality_table: torch.Tensor | None = None, block_ids=None,
                 edit_mask=None) -> tuple[torch.Tensor, MaskedStats]:
    """ReCAP decoding: the MaskGIT schedule over `steps`, a full pass every full_every steps
    (the first step is always full) and cheap context-reusing passes in between. block_ids and
    edit_mask: editing, as in maskgit_decode (the kept tokens are context of every full pass)."""
    if not isinstance(full_every, int) or full_every < 1:
        raise ValueError(f"full_every: expected an int >= 1 (1 = every step is a full pass), got {full_every!r}")
    pre, suf = _check(model, prefix_ids, length, steps, mask_id, suffix_ids)
    edit = _check_edit(block_ids, edit_mask, pre, length, steps, model.cfg.vocab_size)
    dec = _Decoder(pre, suf, length, steps, mask_id, dict(temperature=temperature, top_k=top_k, top_p=top_p),
                   allowed_range, choice_temperature, seed, edit)
    stats = MaskedStats(steps=steps)
    B, P = pre.shape
    S = suf.shape[1]
    L = P + length + S
    cache = KVCache.for_model(model, batch=B, capacity=L)
    for t in range(steps):
        if t % full_every == 0:
            logits, active, n_ctx = full_pass(model, dec.sequence(), dec.masked, P, cache, modality_table)
            stats.full_passes += 1
            stats.token_evals += B * L
        else:
            logits = cheap_pass(model, dec.block, active, P, cache, n_ctx, modality_table)
            stats.cheap_passes += 1
            stats.token_evals += B * active.shape[1]
        dec.step(t, logits, active)
    return dec.block, stats


def full_pass(model, seq: torch.Tensor, masked: torch.Tensor, P: int, cache: KVCache, modality_table=None):
    """A full bidirectional pass over seq [B, L] that leaves the context's keys/values (every
    position not masked in the block [B, n] starting at P) in the cache's first n_ctx slots.
    Returns (logits [B, A, V] at the masked block positions, those positions [B, A], n_ctx)."""
    B, L = seq.shape
    n = masked.shape[1]
    dev = seq.device
    is_masked = torch.zeros(B, L, dtype=torch.int8, device=dev)
    is_masked[:, P:P + n] = masked.to(torch.int8)
    # context first, masked last; attention is bidirectional, so only the positions matter
    order = torch.sort(is_masked, dim=1, stable=True).indices
    n_ctx = L - int(masked[0].sum())
    ids = seq.gather(1, order)
    cache.truncate(0)
    logits = model(ids, modality_ids=modality_ids(model, ids, modality_table),
                   attn_mask=torch.ones(B, L, L, dtype=torch.bool, device=dev), positions=order, cache=cache)
    cache.truncate(n_ctx)
    return logits[:, n_ctx:], order[:, n_ctx:] - P, n_ctx


def cheap_pass(model, block: torch.Tensor, active: torch.Tensor, P: int, cache: KVCache, n_ctx: int,
               modality_table=None) -> torch.Tensor:
    """Evaluate only the block positions `active` [B, A] (their current ids) against the context
    features the last full pass stored; logits [B, A, V]. The cache is left at n_ctx slots."""
    ids = block.gather(1, active)
    B, A = ids.shape
    logits = model(ids, modality_ids=modality_ids(model, ids, modality_table),
                   attn_mask=torch.ones(B, A, A, dtype=torch.bool, device=ids.device),
                   positions=P + active, cache=cache)
    cache.truncate(n_ctx)
    return logits
