"""Soft Thinking (Zhang et al., "Soft Thinking: Unlocking the Reasoning Potential of LLMs in
Continuous Concept Space"): during a reasoning span the model is fed, instead of a sampled token's
embedding, the probability-weighted embedding of its next-token distribution (a "concept token"),

    e_t = sum_i p_i E[i]        p = the processed distribution (temperature, top-k, top-p, min-p),

so the span carries every continuation the model weighs instead of committing to one draw. Each row
leaves the soft span, and is decoded with discrete tokens from then on, when

  * the top token of its concept distribution is `end_think_id` (the paper's </think>): that token
    is fed as a discrete token, as the paper's thinking phase ends;
  * cold stop: the concept distribution's entropy stayed below `cold_stop_entropy` nats for
    `cold_stop_steps` consecutive steps (the model is confident; going on in concept space only
    adds cost and out-of-distribution inputs). The paper answers at that point by inserting
    </think>; here the row switches back to discrete tokens at that point, which is the same when
    the next discrete token is the end of thinking and lets a span that is not finished finish;
  * it has run `max_think` soft steps.

Discrete steps sample with the fused sampler (SamplingConfig, as in mmfm.generate.decode). The
token recorded for a soft step is the concept distribution's top token (what the paper displays).

The loop feeds embeddings through Transformer.forward(inputs_embeds=..., cache=...), so it needs
no hook in the plain decode loop. A one-hot concept (top_k=1) feeds exactly E[argmax], so soft
decoding with top_k=1 is greedy decoding; tests/test_soft.py holds the two to the same tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mmfm.generate.decode import SamplingConfig, _check_prompts, _pad_batch
from mmfm.models.kv_cache import KVCache
from mmfm.ops.sampling import processed_probs, sample


@dataclass
class SoftConfig:
    """How the concept distribution of a soft step is formed and when a row leaves the soft span
    (paper defaults: top_k 15, top_p 0.95; cold stop off)."""
    temperature: float = 1.0
    top_k: int = 15
    top_p: float = 0.95
    min_p: float = 0.0
    max_think: int = 64                 # soft steps at most per row
    end_think_id: int = -1              # the token that ends the span when it is the top token; -1 = none
    cold_stop_entropy: float = 0.0      # nats; 0 = cold stop off
    cold_stop_steps: int = 1            # consecutive low-entropy steps before the switch

    def validate(self, vocab_size: int) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SoftConfig.temperature: must be > 0 (a concept is a distribution), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SoftConfig.top_k: must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SoftConfig.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SoftConfig.min_p: must be in [0, 1), got {self.min_p}")
        if self.max_think < 0:
            raise ValueError(f"SoftConfig.max_think: must be >= 0, got {self.max_think}")
        if not -1 <= self.end_think_id < vocab_size:
            raise ValueError(f"SoftConfig.end_think_id: must be -1 (none) or an id in [0, {vocab_size}), "
                             f"got {self.end_think_id}")
        if self.cold_stop_entropy < 0 or self.cold_stop_steps < 1:
            raise ValueError(f"SoftConfig.cold_stop_entropy must be >= 0 and cold_stop_steps >= 1, got "
                             f"{self.cold_stop_entropy}, {self.cold_stop_steps}")


def concept(logits: torch.Tensor, soft: SoftConfig, embed: torch.Tensor,
            allowed_range: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding [B, D] = probs @ embed, probs [B, V], entropy [B] in nats) of the concept
    distribution: the fused sampler's processed distribution under `soft`'s truncation."""
    probs = processed_probs(logits.float(), temperature=soft.temperature, top_k=soft.top_k, top_p=soft.top_p,
                            min_p=soft.min_p, allowed_range=allowed_range)
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    # dense product: exact whatever the kept set (top-k keeps ties, so it may hold more than k ids);
    # a sparse gather of the kept rows is the optimisation for vocabularies of 100k+
    return probs.to(embed.dtype) @ embed, probs, ent


@torch.no_grad()
def soft_decode(model, prompts: list[torch.Tensor], max_new_tokens: int, soft: SoftConfig | None = None,
                sampling: SamplingConfig | None = None, seed: int = 0, pad_id: int = 0,
                allowed_range: tuple[int, int] | None = None, stats: dict | None = None) -> list[torch.Tensor]:
    """Generate `max_new_tokens` after each prompt, the first ones in concept space (module
    docstring); returns each row's tokens (int64 1-D, CPU; a soft step's token is its concept's top
    token). sampling: the discrete steps' sampler (default: temperature 1). allowed_range: (lo, hi)
    inclusive ids every step may use (e.g. the text range), soft and discrete alike. stats, when a
    dict, receives soft_steps [B] (soft steps per row) and cold_stops [B] (rows that left by cold stop).
    Dense models only (the modality-sparse forward needs modality ids for an embedding input)."""
    soft = soft or SoftConfig()
    sampling = sampling or SamplingConfig()
    cfg = model.cfg
    if cfg.groups != 1:
        raise ValueError("soft_decode: dense models only (a modality-sparse model routes by token id)")
    soft.validate(cfg.vocab_size)
    prompts = _check_prompts(prompts, "prompts", cfg.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"soft_decode: argument 'max_new_tokens' must be an integer >= 1, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    ids, lens = _pad_batch(prompts, pad_id, device)
    B = len(prompts)
    if int(lens.max()) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"soft_decode: the longest prompt plus max_new_tokens ({int(lens.max()) + max_new_tokens}) "
                         f"exceeds the model's max_seq_len {cfg.max_seq_len}")
    rng = None
    if allowed_range is not None:
        lo, hi = allowed_range
        if not 0 <= lo < hi <= cfg.vocab_size:
            raise ValueError(f"soft_decode: argument 'allowed_range' must be (lo, hi), the ids [lo, hi), with "
                             f"0 <= lo < hi <= {cfg.vocab_size}, got {allowed_range}")
        rng = torch.tensor([[lo, hi]] * B, dtype=torch.long, device=device)
    embed = model.embed_tokens.weight
    cache = KVCache.for_model(model, B, capacity=int(lens.max()) + max_new_tokens)
    logits = model(ids, cache=cache, counts=lens)
    last = logits[torch.arange(B, device=device), lens - 1]
    del logits
    thinking = torch.full((B,), soft.max_think > 0, dtype=torch.bool, device=device)
    low_run = torch.zeros(B, dtype=torch.long, device=device)
    n_soft = torch.zeros(B, dtype=torch.long, device=device)
    cold = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    params = asdict(sampling)
    for step in range(max_new_tokens):
        tok = sample(last, allowed_range=rng, seed=seed, offset=step, **params)
        x = embed[tok]
        if bool(thinking.any()):
            emb, probs, ent = concept(last, soft, embed, rng)
            top = probs.argmax(-1)
            ends = thinking & (top == soft.end_think_id)
            if soft.cold_stop_entropy > 0:
                low_run = torch.where(ent < soft.cold_stop_entropy, low_run + 1, torch.zeros_like(low_run))
                stop = thinking & ~ends & (low_run >= soft.cold_stop_steps)
                cold |= stop
            else:
                stop = torch.zeros_like(thinking)
            soft_now = thinking & ~ends & ~stop
            # a row whose span ends here feeds the end token itself, discretely, as the paper's </think>
            tok = torch.where(soft_now | ends, top, tok)
            x = torch.where(soft_now[:, None], emb, embed[tok])
            n_soft += soft_now.long()
            thinking = soft_now & (n_soft < soft.max_think)
        out[:, step] = tok
        if step + 1 < max_new_tokens:
            last = model(None, inputs_embeds=x[:, None, :], cache=cache)[:, -1]
    if stats is not None:
        stats["soft_steps"] = n_soft.cpu()
        stats["cold_stops"] = cold.cpu()
    out = out.cpu()
    return [out[b].clone() for b in range(B)]
