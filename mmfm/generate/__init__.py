"""Any-to-any generation with a static KV cache and the fused sampler (docs/generation.md).

    from mmfm.generate import Bundle, SamplingConfig

    bundle = Bundle.load("runs/demo/export")     # the model, vocab.json and tokenizers/, loaded once
    samples = bundle.generate("a red circle", to="image", out="red.png", cfg_scale=3.0,
                              sampling=SamplingConfig(temperature=0.9, top_k=50))
    samples[0].value      # the decoded image [3, H, W]; samples[0].paths == ["red.png"]

`generate(folder, prompt, to=..., temperature=0.9, ...)` is the same in one call, and
`mmfm generate --model DIR --prompt ... --to M --out PATH` on the command line (commands.py, whose
sampling flags are SamplingConfig's fields). Pieces: bundle.py (Bundle, Sample), prompt.py (prompts
in the unified vocabulary), constraints.py (which ids each row may emit), decode.py (SamplingConfig
and the loop), step.py (the lean dense decode step), outputs.py (file writers and readers);
speculative.py + recycling.py (Token Recycling and draft-model speculative decoding,
docs/speculative.md), masked.py (MaskGIT / ReCAP parallel decoding, editing, BAMM's cascade) and
soft.py (Soft Thinking: concept tokens for the reasoning span).
"""
from __future__ import annotations

import dataclasses

from mmfm.generate.bundle import Bundle, Sample, summary
from mmfm.generate.constraints import Constraints, Target
from mmfm.generate.decode import SamplingConfig, decode

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingConfig))


def generate(model, prompt: str | list[str] = "", to: str = "text", *, sampling: SamplingConfig | None = None,
             **options) -> list[Sample]:
    """`Bundle.load(model).generate(prompt, to, sampling=..., **options)` in one call; model may
    also be a loaded Bundle. The sampler's settings may be given as SamplingConfig's fields
    (temperature=0.9, top_k=50, ...) instead of `sampling`, not both."""
    flat = {k: options.pop(k) for k in list(options) if k in _SAMPLING_FIELDS}
    if flat:
        if sampling is not None:
            raise ValueError(f"generate: give the sampler's settings as 'sampling' or as keyword arguments "
                             f"({', '.join(flat)}), not both")
        sampling = SamplingConfig(**flat)
    bundle = model if isinstance(model, Bundle) else Bundle.load(str(model))
    return bundle.generate(prompt, to, sampling=sampling, **options)


__all__ = ["Bundle", "Constraints", "Sample", "SamplingConfig", "Target", "decode", "generate", "summary"]
