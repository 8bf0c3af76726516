"""The one place mmfm.eval calls the generation API (mmfm/generate): loading an export, laying
out a prompt, and decoding a batch of constrained segments. When that API changes, this module is
the adaptation.

Prompts use the training layout (mmfm/generate/prompt.py): <bos> <begin_text> caption <end_text>
<begin_M> [given M tokens], so the model continues exactly where a training sample's M segment
goes on; a physics prompt carries the first frames' tokens after <begin_physics>.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """Sampler settings of the eval (the fused sampler's; temperature 0 = greedy)."""
    temperature: float = 0.9
    top_k: int = 100
    top_p: float = 1.0
    cfg_scale: float = 1.0     # classifier-free guidance (1 = off)
    seed: int = 0
    batch_size: int = 64       # rows per decode call (x2 with guidance)
    # per generated modality, overriding cfg_scale: guidance is not good for every modality alike
    # (on the demo model guidance 2 doubles the digit score and cuts the tone score to a third)
    cfg_by_modality: dict = field(default_factory=dict)
    # "ar": the decode loop, one token per forward pass; "masked": MaskGIT parallel decoding of the
    # whole segment in `steps` bidirectional passes (mmfm/generate/masked.py), for a model trained
    # with the masked or hybrid objective (the quality-vs-passes curve in docs/benchmarks.md);
    # "cascade": BAMM's cascaded inference for a hybrid-trained model (a causal draft, then the
    # `refine` share of its least confident tokens regenerated in up to `steps` masked passes)
    decode: str = "ar"
    steps: int = 8
    hybrid: bool = False       # masked passes under the hybrid objective's attention (causal prefix)
    refine: float = 0.3        # cascade: the share of draft tokens regenerated

    def guidance(self, modality: str) -> float:
        return float(self.cfg_by_modality.get(modality, self.cfg_scale))


def parse_guidance(values, modalities, where: str = "--cfg-scale") -> tuple[float, dict]:
    """(default scale, {modality: scale}) from items like '2' and 'audio=1' (a later item wins);
    errors name `where` and say what is expected."""
    default, per = 1.0, {}
    for item in values or ():
        name, sep, value = str(item).rpartition("=")
        try:
            scale = float(value)
        except ValueError:
            raise ValueError(f"{where}: {item!r} is not a number or MODALITY=NUMBER (e.g. 2 or audio=1)") from None
        if scale < 0:
            raise ValueError(f"{where}: {item!r}: the scale must be >= 0 (1 = no guidance)")
        if not sep:
            default = scale
        elif name not in modalities:
            raise ValueError(f"{where}: {item!r}: unknown modality {name!r}; expected one of {', '.join(modalities)}")
        else:
            per[name] = scale
    return default, per


def load_export(folder: str):
    """(model, vocab, tokenizers) of an exported folder; errors name the folder."""
    import os

    from mmfm.generate import Bundle

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model {folder!r}: no such folder (an exported model: mmfm export / "
                                "mmfm demo e2e writes <out>/export)")
    b = Bundle.load(folder)
    return b.model, b.vocab, b.tokenizers


class LoadedTokenizers:
    """Already loaded tokenizers {modality: tokenizer}, with the lookups the eval uses."""

    def __init__(self, toks: dict):
        self._toks = dict(toks)

    def __getitem__(self, modality: str):
        if modality not in self._toks:
            raise ValueError(f"no {modality} tokenizer given (have {sorted(self._toks)})")
        return self._toks[modality]

    def segment_length(self, modality: str) -> int:
        return int(self[modality].tokens_per_sample)


def as_tokenizers(tokenizers, vocab):
    """An export's Tokenizers (mmfm.generate.prompt), a folder laid out as an export's tokenizers/
    (<folder>/<modality>/tokenizer.yaml, loaded lazily), or a dict {modality: tokenizer}."""
    from mmfm.generate.prompt import Tokenizers

    if isinstance(tokenizers, dict):
        return LoadedTokenizers(tokenizers)
    if isinstance(tokenizers, str):
        return Tokenizers(tokenizers, vocab)
    return tokenizers


def prompt_ids(vocab, tokenizers, caption: str, to: str, given: torch.Tensor | None = None) -> torch.Tensor:
    """The prompt of one row; `given`: local ids of the start of the `to` segment (physics frames)."""
    from mmfm.generate.prompt import build_prompt

    ids = build_prompt(vocab, tokenizers, caption, to)
    if given is not None and given.numel():
        ids = torch.cat([ids, vocab.to_global(to, given.reshape(-1).long())])
    return ids


@torch.no_grad()
def generate_tokens(model, vocab, prompts: list[torch.Tensor], to: str, length: int,
                    sampling: Sampling) -> torch.Tensor:
    """Decode `length` tokens of modality `to` after each prompt -> local ids [B, length] (CPU).

    Rows are decoded batch_size at a time; row i of the whole list always gets the sampler seed
    `sampling.seed + chunk index`, so a run repeats exactly for the same batch size."""
    from mmfm.generate import Constraints, SamplingConfig, Target, decode
    from mmfm.generate.prompt import unconditional_prompt

    if sampling.decode not in ("ar", "masked", "cascade"):
        raise ValueError(f"decode: expected 'ar', 'masked' or 'cascade', got {sampling.decode!r}")
    if sampling.decode in ("masked", "cascade"):
        return _masked_tokens(model, vocab, prompts, to, length, sampling)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    table = vocab.modality_table(device) if model.cfg.groups > 1 else None
    cfg = SamplingConfig(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    r = vocab.ranges[to]
    out = []
    try:
        for c, start in enumerate(range(0, len(prompts), sampling.batch_size)):
            chunk = prompts[start:start + sampling.batch_size]
            cons = Constraints(vocab, [Target(to, length)] * len(chunk), device=device)
            scale = sampling.guidance(to)
            uncond = [unconditional_prompt(vocab, to, p) for p in chunk] if scale != 1.0 else None
            rows = decode(model, chunk, cons, cfg, uncond=uncond, cfg_scale=scale,
                          seed=sampling.seed + c, pad_id=vocab.pad_id, mod_table=table)
            for row in rows:
                body = row[(row >= r.start) & (row < r.stop)][:length]
                if body.numel() != length:
                    raise RuntimeError(f"generate_tokens: a {to} row came back with {body.numel()} of {length} tokens")
                out.append(vocab.to_local(to, body))
    finally:
        model.train(was_training)
    return torch.stack(out)


@torch.no_grad()
def _masked_tokens(model, vocab, prompts: list[torch.Tensor], to: str, length: int,
                   sampling: Sampling) -> torch.Tensor:
    """generate_tokens by MaskGIT (or BAMM's cascade): rows are batched by prompt length (a row has
    no padding, so that full attention needs no padding mask); the segment sits between the prompt
    and its end marker + <eos>, as in Bundle.generate(decoding="masked"). The c-th chunk decoded
    gets seed + c."""
    from mmfm.generate.masked import cascade_decode, maskgit_decode

    if sampling.guidance(to) != 1.0:
        raise ValueError(f"decode {sampling.decode!r} does not take classifier-free guidance (cfg_scale must be 1)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    r = vocab.ranges[to]
    suffix = torch.tensor([vocab.end_id(to), vocab.eos_id])
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(int(p.numel()), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    c = 0
    try:
        for rows in by_len.values():
            for start in range(0, len(rows), sampling.batch_size):
                chunk = rows[start:start + sampling.batch_size]
                pre = torch.stack([prompts[i].reshape(-1).long() for i in chunk]).to(device)
                kw = dict(mask_id=vocab.mask_id, steps=sampling.steps, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, allowed_range=(r.start, r.stop),
                          suffix_ids=suffix, seed=sampling.seed + c, modality_table=vocab.modality_table(device))
                if sampling.decode == "cascade":
                    block, _, _ = cascade_decode(model, pre, length, refine=sampling.refine, **kw)
                else:
                    block, _ = maskgit_decode(model, pre, length, hybrid=sampling.hybrid, **kw)
                c += 1
                for j, i in enumerate(chunk):
                    out[i] = vocab.to_local(to, block[j].cpu())
    finally:
        model.train(was_training)
    return torch.stack(out)
