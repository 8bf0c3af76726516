"""`mmfm finetune --from CKPT_OR_EXPORT --modality M --config configs/finetune/<name>.yaml [overrides]`.

The same Trainer as `mmfm pretrain` (mmfm/train/loop.py, mmfm/train/trainer.py: DeepSpeed,
checkpoints, exact resume), with:
  - weights from --from (an export folder or a pretrain output folder); the model config is the
    source's ModelConfig object (a `model:` section in the file is ignored; model overrides are refused);
  - the loss restricted to modality M: every other modality, and the specials, are in
    objective.no_loss (M's own <begin_M>/<end_M> markers belong to M and keep their loss);
  - the typed `finetune:` section (FinetuneSection, mmfm/train/config.py): method full or lora,
    and freezing; its modality and source are filled from --modality / --from.
The merge is of objects (`build_config`: dataclasses.replace), not of override strings.

Freezing is per tensor (`requires_grad = False`, so frozen tensors get no optimizer state):
  - modality_specific: the tensors indexed by modality: the token embedding and the output head
    (their rows are per-modality ranges of the vocabulary), and in a modality-sparse model every
    per-modality weight stack;
  - shared: everything else (a dense model's attention, MLP and norm weights).
LoRA (dense models): each targeted projection W gets W x + (alpha / r) B A x, A [r, in] random,
B [out, r] zero, W frozen (so LoRA implies freezing everything but A and B, plus what `train_also`
lists). `mmfm export` of a LoRA run merges W + (alpha / r) B A into plain Llama weights;
`merge_lora_state` is that merge (tests: merged logits equal the unmerged model's).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from mmfm.models.lora import apply_lora
from mmfm.train.config import FinetuneSection, parse_finetune


def parse_section(raw: dict, path: str) -> FinetuneSection:
    """A `finetune:` mapping -> FinetuneSection (mmfm/train/config.py), errors naming file and field."""
    return parse_finetune(raw, path)


def is_modality_specific(name: str, param, model) -> bool:
    if name.startswith("embed_tokens") or name.startswith("lm_head"):
        return True
    return model.cfg.groups > 1 and ("layers." in name or name.startswith("norm"))


def apply_freeze(model, f: FinetuneSection):
    if f.freeze == "none":
        return model
    for n, p in model.named_parameters():
        specific = is_modality_specific(n, p, model)
        if (f.freeze == "modality_specific") == specific:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"finetune.freeze={f.freeze}: nothing left to train in this model")
    return model


def prepare(f: FinetuneSection):
    def fn(model):
        model = (apply_lora(model, f.lora_targets, f.lora_rank, f.scale, f.train_also) if f.method == "lora"
                 else apply_freeze(model, f))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"[finetune] {f.method}: {n_train} of {n_all} parameters trainable", file=sys.stderr, flush=True)
        return model
    return fn


# ------------------------------------------------------------------------------------ command
def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune one modality from an export or a pretrain run (full or LoRA)")
    p.add_argument("--from", dest="source", required=True, help="export folder or pretrain output folder")
    p.add_argument("--modality", required=True, help="the modality whose tokens get the loss")
    p.add_argument("--config", required=True, help="configs/finetune/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20")
    p.add_argument("--local_rank", type=int, default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def source_model_config(source: str):
    import json

    from mmfm.models.config import ModelConfig

    if os.path.exists(os.path.join(source, "mmfm_model.json")):
        with open(os.path.join(source, "mmfm_model.json")) as f:
            return ModelConfig(**json.load(f))
    path = os.path.join(source[:-len("/checkpoints")] if source.rstrip("/").endswith("checkpoints") else source,
                        "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--from {source}: neither an export (mmfm_model.json) nor a pretrain run (config.json)")
    with open(path) as f:
        return ModelConfig(**json.load(f)["model"])


def build_config(args):
    """The run config of `mmfm finetune`: the file (with its overrides) read around the source's model
    config, then merged as objects: train.init_from = --from, every modality but --modality in
    objective.no_loss, and the finetune section's modality and source filled in."""
    from mmfm.train.config import load_run_config, validate
    from mmfm.typed_config import ConfigError
    from mmfm.vocab import Vocab

    source = os.path.abspath(args.source)
    cfg = load_run_config(args.config, args.overrides, model=source_model_config(args.source))
    vocab = Vocab.load(cfg.data.vocab)
    if args.modality not in vocab.ranges:
        raise ConfigError(f"--modality {args.modality!r}: not in the vocabulary ({', '.join(vocab.ranges)})")
    others = {m for m in vocab.modality_names if m != args.modality}
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, init_from=source),
        objective=dataclasses.replace(cfg.objective, no_loss=sorted(set(cfg.objective.no_loss) | others)),
        finetune=dataclasses.replace(cfg.finetune or FinetuneSection(), modality=args.modality, source=source))
    validate(cfg)
    return cfg, cfg.finetune


def cmd_finetune(args, hooks=None) -> int:
    """hooks: fault injection for tests (mmfm/train/trainer.py: Hooks)."""
    from mmfm.train.loop import TrainingStopped, run
    from mmfm.typed_config import ConfigError

    try:
        cfg, f = build_config(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mmfm finetune: {exc}", file=sys.stderr)
        return 2
    try:
        res = run(cfg, prepare_model=prepare(f), hooks=hooks)
    except TrainingStopped as exc:
        print(f"mmfm finetune: {exc}", file=sys.stderr)
        return 3
    if torch.distributed.get_rank() == 0:
        key = f"eval_loss_{args.modality}"
        a, b = (res.get("eval_start") or {}).get(key), (res.get("eval_end") or {}).get(key)
        held = f", held-out {args.modality} loss {a:.4f} -> {b:.4f}" if a is not None and b is not None else ""
        print(f"finetune ({f.method}, {args.modality}): step {res['step']}{held}; outputs in {res['out']} "
              f"(mmfm export {res['out']} --out DIR{' merges LoRA' if f.method == 'lora' else ''})")
    return 0
