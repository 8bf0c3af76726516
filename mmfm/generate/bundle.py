"""The generation API as objects: a `Bundle` (an exported model folder, loaded once) generates
`Sample`s with the settings of a `SamplingConfig`.

    bundle = Bundle.load("runs/demo/export")
    samples = bundle.generate("a red circle", to="image", out="red.png", cfg_scale=3.0,
                              sampling=SamplingConfig(temperature=0.9, top_k=50))
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from mmfm.generate.constraints import Constraints, Target, text_allowed_mask
from mmfm.generate.decode import SamplingConfig, decode
from mmfm.generate.prompt import Tokenizers, build_prompt, unconditional_prompt
from mmfm.vocab import Vocab


@dataclass
class Sample:
    """One generated row: its modality, the tokenizer-local ids, the decoded value (str or tensor)
    and the files written (empty without `out`)."""
    modality: str
    tokens: torch.Tensor
    value: object
    paths: list = field(default_factory=list)
    prompt: str = ""


@dataclass
class Bundle:
    """An exported model folder, loaded: the model, its vocabulary and its tokenizers."""
    model: torch.nn.Module
    vocab: Vocab
    tokenizers: Tokenizers
    folder: str = ""

    @classmethod
    def load(cls, folder: str) -> "Bundle":
        from mmfm.models.io import load

        if not os.path.exists(os.path.join(folder, "mmfm_model.json")):
            raise FileNotFoundError(f"--model {folder!r}: not an exported model folder (no mmfm_model.json; "
                                    "make one with mmfm export)")
        vpath = os.path.join(folder, "vocab.json")
        if not os.path.exists(vpath):
            raise FileNotFoundError(f"--model {folder!r}: no vocab.json (export with a run that names data.vocab)")
        vocab = Vocab.load(vpath)
        model = load(folder)
        if model.cfg.vocab_size != vocab.size:
            raise ValueError(f"--model {folder!r}: the model's vocab_size {model.cfg.vocab_size} differs from "
                             f"vocab.json's size {vocab.size}")
        return cls(model, vocab, Tokenizers(os.path.join(folder, "tokenizers"), vocab), folder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt: str | list[str] = "", to: str = "text", *, sampling: SamplingConfig | None = None,
                 inputs: dict | None = None, out: str | None = None, max_new_tokens: int = 64,
                 cfg_scale: float = 1.0, seed: int = 0, stop_ids=(), progress: bool = False,
                 speculative: str | None = None, draft_model=None, stats: dict | None = None,
                 coprocessor=None, augment_every: int = 0, decoding: str = "ar", steps: int = 8,
                 recap: bool = False) -> list[Sample]:
        """Generate one `to` sample per prompt (a string or a list of strings: a batch).

        sampling: the sampler's settings (default SamplingConfig(): plain sampling at temperature 1).
        inputs: {modality: value or file path} conditioning every row (e.g. {"image": "in.png"}).
        out: a path; each sample is written there (batch rows as <stem>-<i><ext>) in the modality's
        format (outputs.py). max_new_tokens: the text limit (a modality segment always has its
        tokenizer's length). cfg_scale: classifier-free guidance (1 = off; 0 = unconditional).
        seed: the sampler's Philox seed (a run repeats exactly).

        speculative: None, "token_recycling" or "draft" (draft_model: an exported folder or a Bundle of
        a smaller model over the same vocabulary). Lossless: the output distribution is plain
        sampling's (docs/speculative.md). Text only, one row at a time, no CFG and no penalties; the
        model's full vocabulary is sampled and the text segment is cut at the first non-text id, as
        with plain decoding. `stats`, when a dict, receives the acceptance figures per prompt.

        decoding: "ar" (the decode loop) or "masked": MaskGIT parallel decoding of the whole segment in
        `steps` bidirectional passes (recap=True: ReCAP, a full pass every second step and cheap
        context-reusing ones between), for a model trained with the masked or hybrid objective; the
        segment sits between the prompt and its end marker + <eos>; temperature, top_k and top_p apply
        (masked.py). No CFG, speculative decoding or coprocessor with it.

        coprocessor: a trained cache-augmentation coprocessor (a folder from mmfm cacheaug train, or a
        mmfm.cacheaug.Coprocessor) for this model: the cache is augmented with its latents at the
        prompt's end and, with augment_every=M, before every M-th generated token (docs/cacheaug.md).
        """
        sampling = SamplingConfig() if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"argument 'sampling' must be a SamplingConfig, got {type(sampling).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("argument 'prompt' must be a string or a non-empty list of strings")
        vocab, toks = self.vocab, self.tokenizers
        if to not in vocab.ranges:
            raise ValueError(f"argument 'to' is {to!r}; this model can generate {list(vocab.ranges)}")
        if to == "text":
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"argument 'max_new_tokens' must be an integer >= 1, got {max_new_tokens!r}")
            length = max_new_tokens
        else:
            length = toks.segment_length(to)
        paths = None
        if out:   # a wrong extension fails before any decoding
            from mmfm.generate.outputs import output_path

            paths = [output_path(str(out), to, None if len(prompts) == 1 else i) for i in range(len(prompts))]
        ids = [build_prompt(vocab, toks, p, to, inputs) for p in prompts]
        if coprocessor is not None and speculative is not None:
            raise ValueError("arguments 'coprocessor' and 'speculative' do not combine")
        if isinstance(coprocessor, (str, os.PathLike)):
            from mmfm.cacheaug import load_coprocessor

            coprocessor = load_coprocessor(str(coprocessor), self.model)
        if decoding not in ("ar", "masked"):
            raise ValueError(f"argument 'decoding' must be 'ar' or 'masked', got {decoding!r}")
        if decoding == "masked":
            if speculative is not None or coprocessor is not None or cfg_scale != 1.0:
                raise ValueError("decoding='masked' does not combine with speculative, coprocessor or cfg_scale")
            return self._finish(to, prompts, self._masked(ids, to, length, steps, recap, sampling, seed), paths)
        if speculative is not None:
            new = self._speculative(ids, speculative, draft_model, length, seed, stats, to=to, cfg_scale=cfg_scale,
                                    sampling=sampling)
            return self._finish(to, prompts, new, paths)
        uncond = [unconditional_prompt(vocab, to, p) for p in ids] if cfg_scale != 1.0 else None
        cons = Constraints(vocab, [Target(to, length)] * len(prompts), device=self.device, stop_ids=stop_ids)
        new = decode(self.model, ids, cons, sampling, uncond=uncond, cfg_scale=cfg_scale, seed=seed,
                     pad_id=vocab.pad_id, mod_table=vocab.modality_table(self.device), progress=progress,
                     coprocessor=coprocessor, augment_every=augment_every)
        return self._finish(to, prompts, new, paths)

    def _speculative(self, ids, method, draft_model, length, seed, stats, *, to, cfg_scale,
                     sampling: SamplingConfig) -> list[torch.Tensor]:
        from mmfm.generate.speculative import draft_model_generate, token_recycling_generate

        if method not in ("token_recycling", "draft"):
            raise ValueError(f"argument 'speculative' must be 'token_recycling' or 'draft', got {method!r}")
        if to != "text":
            raise ValueError(f"argument 'speculative' decodes text only (got to={to!r}); "
                             "modality segments use the constrained plain loop")
        if cfg_scale != 1.0 or sampling.uses_history():
            raise ValueError("argument 'speculative' does not combine with cfg_scale or penalties")
        drafter = None
        if method == "draft":
            if draft_model is None:
                raise ValueError("argument 'draft_model' is required with speculative='draft'")
            drafter = (draft_model if isinstance(draft_model, Bundle) else Bundle.load(str(draft_model))).model
            if drafter.cfg.vocab_size != self.model.cfg.vocab_size:
                raise ValueError(f"argument 'draft_model': vocab_size {drafter.cfg.vocab_size} differs from the "
                                 f"model's {self.model.cfg.vocab_size}")
        vocab = self.vocab
        settings = {k: getattr(sampling, k) for k in ("temperature", "top_k", "top_p", "min_p", "typical_p")}
        allowed = text_allowed_mask(vocab, self.device)   # the plain loop's text constraint: the same greedy output
        out = []
        with torch.inference_mode():
            for i, row in enumerate(ids):
                kw = dict(max_new_tokens=length, seed=seed + i, eos_id=vocab.eos_id,
                          modality_table=vocab.modality_table(self.device), allowed_mask=allowed, **settings)
                if method == "token_recycling":
                    toks, st = token_recycling_generate(self.model, row, **kw)
                else:
                    toks, st = draft_model_generate(self.model, drafter, row, **kw)
                if stats is not None:
                    stats.setdefault("rows", []).append(st.as_dict())
                out.append(toks)
        return out

    def _masked(self, ids, to, length, steps, recap, sampling: SamplingConfig, seed) -> list[torch.Tensor]:
        """Each row's segment by MaskGIT / ReCAP (one row at a time: prompts differ in length)."""
        from mmfm.generate.masked import maskgit_decode, recap_decode

        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= length:
            raise ValueError(f"argument 'steps' must be an integer in [1, {length}] (the segment's length), got {steps!r}")
        vocab = self.vocab
        r = vocab.ranges[to]
        suffix = torch.tensor([vocab.end_id(to), vocab.eos_id])
        kw = dict(mask_id=vocab.mask_id, steps=steps, temperature=sampling.temperature, top_k=sampling.top_k,
                  top_p=sampling.top_p, allowed_range=(r.start, r.stop), suffix_ids=suffix,
                  modality_table=vocab.modality_table(self.device))
        out = []
        for i, row in enumerate(ids):
            if recap:
                block, _ = recap_decode(self.model, row, length, full_every=2, seed=seed + i, **kw)
            else:
                block, _ = maskgit_decode(self.model, row, length, seed=seed + i, **kw)
            out.append(block[0].cpu())
        return out

    def _finish(self, to, prompts, new, paths) -> list[Sample]:
        vocab, toks = self.vocab, self.tokenizers
        samples = []
        for i, row in enumerate(new):
            local = _segment(vocab, to, row)
            tok = toks[to]
            value = tok.decode(local)
            s = Sample(to, local, value, prompt=prompts[i])
            if paths:
                from mmfm.generate.outputs import write_output

                config = getattr(tok, "config", None)
                s.paths = write_output(paths[i], to, value, sample_rate=getattr(config, "sample_rate", None),
                                       fps=getattr(config, "fps", None) or None)
            samples.append(s)
        return samples


def _segment(vocab: Vocab, to: str, new: torch.Tensor) -> torch.Tensor:
    """The generated ids of one row -> the target segment's local ids (markers and <eos> dropped)."""
    r = vocab.ranges[to]
    keep = (new >= r.start) & (new < r.stop)
    body = new[keep] if to != "text" else new[:int(keep.long().cumprod(0).sum())]
    return vocab.to_local(to, body)


def summary(samples: list[Sample]) -> str:
    return json.dumps([{"modality": s.modality, "tokens": int(s.tokens.numel()), "paths": s.paths,
                        **({"text": s.value} if s.modality == "text" else {})} for s in samples], indent=1)
