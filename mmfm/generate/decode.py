"""The decoding loop: ragged prefill of a batch of prompts into a static KV cache, then one
token per row per step through the fused `sample` op, with modality constraints, classifier-free
guidance and stop conditions.

    tokens = decode(model, prompts, constraints, SamplingConfig(temperature=0.8, top_p=0.9))

Classifier-free guidance: with `uncond` prompts and cfg_scale s != 1, rows [0, B) are the
conditional prompts and rows [B, 2B) the unconditional ones; both run in the same forward pass,
and the logits mixed before sampling are lerp(uncond, cond, s) = uncond + s (cond - uncond)
(torch.lerp is exact at both ends, so s = 0 gives the unconditional logits and s = 1 the
conditional ones bit for bit). The sampled token is fed to both rows of the pair.

Dense models take each new token through DenseStep (mmfm/generate/step.py), the same function as
Transformer.forward with far fewer ops; modality-sparse ones through Transformer.forward.

The step is kept lean because at demo sizes Python overhead, not arithmetic, bounds the rate:
the cache, the output buffer and the penalty history are allocated once; per step there is one
decode step, one sample call and a handful of elementwise state updates; whether every row has
finished is read back only every `check_every` steps (finished rows keep emitting <eos>).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from mmfm.generate.constraints import Constraints
from mmfm.generate.step import DenseStep
from mmfm.models.kv_cache import KVCache
from mmfm.ops.sampling import sample


def _opt(default, text: str):
    """A field with its flag's help (commands.py turns every field into a flag)."""
    return field(default=default, metadata={"help": text})


@dataclass
class SamplingConfig:
    """The fused sampler's settings (mmfm.ops.sampling.sample, which checks their values and
    applies them in the order its module docstring gives). Each field is also a flag of
    `mmfm generate` (commands.py builds them from these fields and their help)."""
    temperature: float = _opt(1.0, "softmax temperature; 0 = greedy")
    top_k: int = _opt(0, "keep the k most likely tokens; 0 = off")
    top_p: float = _opt(1.0, "nucleus: keep the smallest head holding this much of the mass; 1 = off")
    min_p: float = _opt(0.0, "keep tokens at least this fraction of the top token's probability; 0 = off")
    typical_p: float = _opt(1.0, "locally typical sampling mass; 1 = off")
    repetition_penalty: float = _opt(1.0, "divide (or multiply, if negative) the logit of every token seen "
                                          "in the prompt or output; 1 = off")
    presence_penalty: float = _opt(0.0, "subtract from the logit of every token seen once or more; 0 = off")
    frequency_penalty: float = _opt(0.0, "subtract this times the count of every token seen; 0 = off")

    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def modality_ids(model, ids: torch.Tensor, table: torch.Tensor | None, arg: str = "modality_table"):
    """The modality ids `model` reads with `ids`: None for a dense model, `table[ids]` for a
    modality-sparse one (table: Vocab.modality_table(); `arg` names it in the error)."""
    if model.cfg.groups == 1:
        return None
    if table is None:
        raise ValueError(f"argument '{arg}': a modality-sparse model needs the vocabulary's token -> modality "
                         "table (Vocab.modality_table())")
    return table.to(ids.device)[ids]


def _pad_batch(prompts: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = [int(p.numel()) for p in prompts]
    ids = torch.full((len(prompts), max(lens)), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :lens[i]] = p.reshape(-1).cpu()
    return ids.to(device), torch.tensor(lens, dtype=torch.long, device=device)


def _check_prompts(prompts, name: str, V: int) -> list[torch.Tensor]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"decode: argument '{name}' must be a non-empty list of 1-D token tensors")
    out = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"decode: {name}[{i}] must be a non-empty 1-D integer tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if int(t.min()) < 0 or int(t.max()) >= V:
            raise ValueError(f"decode: {name}[{i}] holds ids outside [0, {V}) (the model's vocab_size)")
        out.append(t.long())
    return out


@torch.no_grad()
def decode(model, prompts: list[torch.Tensor], constraints: Constraints | None, sampling: SamplingConfig | None = None,
           max_new_tokens: int | None = None, uncond: list[torch.Tensor] | None = None, cfg_scale: float = 1.0,
           seed: int = 0, pad_id: int = 0, mod_table: torch.Tensor | None = None, progress: bool = False,
           check_every: int = 8, stop_on_done: bool = True, coprocessor=None,
           augment_every: int = 0) -> list[torch.Tensor]:
    """Generate after each prompt; returns the new tokens of each row (int64 1-D, on the CPU).

    prompts: B 1-D tensors of unified ids (ragged). constraints: the per-row state machine (or
    None: unconstrained, stop only at max_new_tokens). max_new_tokens: steps to run at most
    (default: the longest constrained segment + 1 for its end marker). uncond: B unconditional
    prompts for classifier-free guidance with cfg_scale (1 = off). seed: the sampler's Philox
    seed; step i uses offset i, so a run repeats exactly. mod_table: token -> modality index for
    modality-sparse models (Vocab.modality_table()).

    coprocessor: a cache-augmentation coprocessor (mmfm.cacheaug, docs/cacheaug.md): every row's cache
    is augmented with its N latents before the prompt's last token is fed, and again before every
    augment_every-th generated token is fed (0 = at the prompt's end only). Tokens keep their own
    positions (slot minus latent slots), as the coprocessor was trained. None: the plain decoder.
    """
    sampling = sampling or SamplingConfig()
    cfg = model.cfg
    V = cfg.vocab_size
    prompts = _check_prompts(prompts, "prompts", V)
    B = len(prompts)
    if constraints is not None and constraints.batch != B:
        raise ValueError(f"decode: constraints hold {constraints.batch} rows but there are {B} prompts")
    if max_new_tokens is None:
        if constraints is None:
            raise ValueError("decode: argument 'max_new_tokens' is needed when there are no constraints")
        max_new_tokens = max(t.length + (0 if t.modality == "text" else 1) for t in constraints.targets)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"decode: argument 'max_new_tokens' must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(cfg_scale, (int, float)) or not cfg_scale == cfg_scale:
        raise ValueError(f"decode: argument 'cfg_scale' must be a finite number, got {cfg_scale!r}")
    guided = uncond is not None and float(cfg_scale) != 1.0
    if guided:
        uncond = _check_prompts(uncond, "uncond", V)
        if len(uncond) != B:
            raise ValueError(f"decode: argument 'uncond' has {len(uncond)} prompts; it needs one per prompt ({B})")
    if isinstance(augment_every, bool) or not isinstance(augment_every, int) or augment_every < 0:
        raise ValueError(f"decode: argument 'augment_every' must be an integer >= 0, got {augment_every!r}")
    rows = prompts + (uncond if guided else [])
    device = next(model.parameters()).device
    ids, lens = _pad_batch(rows, pad_id, device)
    n_lat = 0 if coprocessor is None else int(coprocessor.num_latents)
    augments = 1 + ((max_new_tokens - 1) // augment_every if augment_every else 0)
    need = int(lens.max()) + max_new_tokens + n_lat * augments   # cache slots (latents take slots, not positions)
    if int(lens.max()) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"decode: the longest prompt ({int(lens.max())} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) is {int(lens.max()) + max_new_tokens}, beyond the model's max_seq_len {cfg.max_seq_len}")
    sparse = cfg.groups > 1
    mod_table = None if mod_table is None or not sparse else mod_table.to(device)   # moved once, not per step

    def mods(x):
        return modality_ids(model, x, mod_table, "mod_table")

    mods(ids)   # a sparse model without a table fails here, before the cache is allocated

    cache = KVCache.for_model(model, len(rows), capacity=need)
    latent_slots = 0
    if coprocessor is None:
        logits = model(ids, modality_ids=mods(ids), cache=cache, counts=lens)
        last = logits[torch.arange(len(rows), device=device), lens - 1]          # [rows, V]
        del logits
    else:   # prefill all but the last prompt token, augment, then feed the last token
        from mmfm.cacheaug import augment

        if int(lens.max()) > 1:
            head = ids[:, :int(lens.max()) - 1]
            model(head, modality_ids=mods(head), cache=cache, counts=lens - 1)
        latent_slots += augment(model, coprocessor, cache, cache.lengths.clone())
        feed0 = ids[torch.arange(len(rows), device=device), lens - 1][:, None]
        last = model(feed0, modality_ids=mods(feed0), cache=cache,
                     positions=(cache.lengths - latent_slots)[:, None])[:, -1]
    # dense models step through DenseStep (same function, far fewer ops per token); with latents in
    # the cache positions are not slots, so the general forward takes explicit positions
    fast = DenseStep(model, need) if not sparse and coprocessor is None else None
    upto = int(lens.max()) + 1
    ragged = bool((lens != lens[0]).any())

    params = asdict(sampling)
    history = None
    if sampling.uses_history():   # penalties see the prompt and every token emitted so far
        history = torch.full((B, need), -1, dtype=torch.long, device=device)
        history[:, :ids.shape[1]] = torch.where(ids[:B] == pad_id, torch.full_like(ids[:B], -1), ids[:B])
        hist_pos = lens[:B].clone()
        row_idx = torch.arange(B, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", file=sys.stderr, leave=False)
    scale = float(cfg_scale)
    try:
        for step in range(max_new_tokens):
            z = torch.lerp(last[B:], last[:B], scale) if guided else last
            tok = sample(z, allowed_range=None if constraints is None else constraints.allowed_range(),
                         allowed_mask=None if constraints is None else constraints.allowed_mask(),
                         history=history, seed=seed, offset=step, **params)
            out[:, step] = tok
            if constraints is not None:
                emitted = constraints.update(tok)
                n_out += emitted
            else:
                n_out += 1
            if history is not None:
                history[row_idx, hist_pos] = tok
                hist_pos += 1
            if bar is not None:
                bar.update(1)
            if step + 1 == max_new_tokens:
                break
            if (stop_on_done and constraints is not None and (step + 1) % check_every == 0
                    and constraints.all_done()):
                break
            feed = torch.cat([tok, tok]) if guided else tok
            if fast is not None:
                last = fast(feed, cache, upto, ragged)
                upto += 1
            elif coprocessor is not None:
                if augment_every and (step + 1) % augment_every == 0:
                    latent_slots += augment(model, coprocessor, cache, cache.lengths - latent_slots)
                f = feed[:, None]
                last = model(f, modality_ids=mods(f), cache=cache,
                             positions=(cache.lengths - latent_slots)[:, None])[:, -1]
            else:
                last = model(feed[:, None], modality_ids=mods(feed[:, None]), cache=cache)[:, -1]
    finally:
        if bar is not None:
            bar.close()
    out, n_out = out.cpu(), n_out.cpu()
    return [out[b, :int(n_out[b])].clone() for b in range(B)]
