"""The export's model card (README.md): what the model is, how to load it, what it was trained on
and how it scored, from the run's own records (config.json, summary.json, metrics.jsonl), so the
card is written, never hand-edited, and says nothing the run did not record."""
from __future__ import annotations

import json
import os

import yaml

from mmfm.models import ModelConfig


def _last_eval(run_dir: str | None) -> dict:
    """The newest logged value of every eval_* metric (held-out loss, prompt-following scores)."""
    path = os.path.join(run_dir or "", "metrics.jsonl")
    if not run_dir or not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.update({k: (row["step"], v) for k, v in row.items() if k.startswith("eval") and
                            isinstance(v, (int, float))})
    return out


def _summary(run_dir: str | None) -> dict:
    path = os.path.join(run_dir or "", "summary.json")
    if not run_dir or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def model_card(cfg: ModelConfig, vocab, run_cfg: dict | None, run_dir: str | None, has_tokenizer: bool) -> str:
    dense = cfg.groups == 1
    lines = ["---", "library_name: " + ("transformers" if dense else "mmfm"), "tags:", "- mmfm", "- multimodal",
             "- any-to-any", "pipeline_tag: text-generation", "---", "",
             "# mmfm model", "",
             f"A decoder over one unified vocabulary ({cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads} heads, "
             f"{cfg.n_kv_heads} key/value heads, {cfg.num_params() / 1e6:.2f} M parameters"
             + (f", modality-sparse with {cfg.groups} weight groups" if not dense else "") + "), exported by "
             "`mmfm export`.", ""]
    if vocab is not None:
        lines += ["## Vocabulary", "", "| range | ids |", "| --- | --- |"]
        lines += [f"| {r.name} | [{r.start}, {r.stop}) |" for r in vocab.ranges.values()]
        lines += [f"| special tokens and markers | [{vocab.special_start}, {vocab.size}) |", ""]
    lines += ["## Loading", ""]
    if dense:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")']
        if has_tokenizer:
            lines += ['tok = AutoTokenizer.from_pretrained("THIS_FOLDER")',
                      'pipeline("text-generation", model="THIS_FOLDER")("a red circle", max_new_tokens=20)']
        lines += ["```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)', "```", ""]
    lines += ["Every modality: `mmfm generate --model THIS_FOLDER --prompt ... --to image|audio|video|3d|physics|text` "
              "or `mmfm.load(\"THIS_FOLDER\")`."
              + (" Text ids are the text tokenizer's ids; every other id is an added special token "
                 "(`<|image_00123|>`, `<|begin_image|>`, `<|bos|>`, ...)." if has_tokenizer else ""), ""]
    if run_cfg:
        data = run_cfg.get("data") or {}
        train = run_cfg.get("train") or {}
        lines += ["## Training data", ""]
        lines += [f"- {k}: {v}" for k, v in data.items() if v not in (None, "", [], {})]
        sizes = [train.get("steps"), train.get("micro_batch"), train.get("grad_accum", 1),
                 run_cfg.get("world_size", 1), data.get("seq_len")]
        if all(isinstance(x, int) for x in sizes):
            n = sizes[0] * sizes[1] * sizes[2] * sizes[3] * sizes[4]
            lines.append(f"- tokens seen (steps x micro_batch x grad_accum x ranks x seq_len, padding included): {n:,}")
        lines += ["", "## Training config", "", "```yaml",
                  yaml.safe_dump({k: v for k, v in run_cfg.items()}, sort_keys=False).rstrip(), "```", ""]
    start = _summary(run_dir).get("eval_start") or {}
    rows = [f"| {k} (before training) | 0 | {v:.4f} |" for k, v in start.items() if isinstance(v, (int, float))]
    rows += [f"| {k} | {s} | {v:.4f} |" for k, (s, v) in sorted(_last_eval(run_dir).items())]
    if rows:   # a run without a held-out split logged none: no section rather than an empty table
        lines += ["## Evaluation", "", "| metric | step | value |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(lines)
