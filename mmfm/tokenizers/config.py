"""Typed tokenizer configs read from YAML (configs/tokenizers/<name>.yaml).

A file has four top-level sections:

    tokenizer: image_conv        # the registry name (mmfm.tokenizers.registry)
    model: {...}                 # the tokenizer's own dataclass (e.g. ImageConvConfig)
    data: {...}                  # DataConfig: shards, held-out split, samples
    train: {...}                 # TrainConfig: steps, batch size, learning rate, output folder

Every section is a dataclass; `from_dict` rejects unknown fields and values of the wrong type
with an error naming the file and the field (`configs/tokenizers/x.yaml: model.levels: expected
list[int], got 'abc'`), so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmfm.typed_config import ConfigError, from_dict, read_sections, to_dict  # noqa: F401 (re-exported)


@dataclass
class DataConfig:
    shards: str = ""                 # shard spec (folder, brace pattern, glob) read with mmfm.data
    modality: str = ""               # only samples whose json 'modality' is this are used
    holdout_fraction: float = 0.1    # share of samples (by key hash) kept out of training for eval
    max_samples: int = 0             # 0 = all; otherwise the first N training samples (fast demos)


@dataclass
class TrainConfig:
    out: str = "runs/tokenizer"      # checkpoints, logs, reconstructions and the saved tokenizer
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 0            # linear warmup, then cosine to lr * min_lr_ratio (engine.lr_at)
    min_lr_ratio: float = 1.0        # 1.0 = constant learning rate after warmup
    clip: float = 1.0                # gradient clipping (DeepSpeed gradient_clipping; 0 = off)
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    keep_last: int = 2               # complete checkpoints kept
    deepspeed: str = ""              # a DeepSpeed JSON, relative to this config (../deepspeed/*.json); "" = ZeRO stage 0
    threads: int = 0                 # torch threads (0 = leave torch's default)


@dataclass
class TokenizerFile:
    """A parsed configs/tokenizers/<name>.yaml."""
    tokenizer: str
    model: object
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: str = ""


def load_config(path) -> TokenizerFile:
    from mmfm.tokenizers.registry import config_class

    path = str(path)
    raw = read_sections(path, ("tokenizer", "model", "data", "train"), files=("train.deepspeed",))
    name = raw.get("tokenizer")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: tokenizer: expected the tokenizer's registry name (a string), got {name!r}")
    try:
        model_cls = config_class(name)
    except KeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    model = from_dict(model_cls, raw.get("model"), f"{path}: model")
    if hasattr(model, "validate"):
        try:
            model.validate()
        except ValueError as exc:
            raise ConfigError(f"{path}: model.{exc}") from None
    return TokenizerFile(name, model, from_dict(DataConfig, raw.get("data"), f"{path}: data"),
                         from_dict(TrainConfig, raw.get("train"), f"{path}: train"), path)
