"""Typed tokenizer configs read from YAML (configs/tokenizers/<name>.yaml).

The sections, the same schema as the model's configs where they overlap:

    tokenizer: image_conv        # the registry name (mmfm.tokenizers.registry)
    model: {...}                 # the tokenizer's own dataclass (e.g. ImageConvConfig)
    data: {...}                  # DataConfig: shards, held-out split, samples
    deepspeed: ../deepspeed/zero1.json   # optional: a DeepSpeed JSON (relative to this file) or mapping (default: ZeRO stage 0)
    optim: {...}                 # mmfm.train.config.OptimSection, pretraining's own (lr, warmup + cosine, clip)
    train: {...}                 # TrainConfig: steps, global batch size, output folder, checkpoints

Every section is a dataclass; `from_dict` rejects unknown fields and values of the wrong type
with an error naming the file and the field (`configs/tokenizers/x.yaml: model.levels: expected
list[int], got 'abc'`), so a typo never silently falls back to a default.

`optim` fields a file leaves out take TOKENIZER_OPTIM's values, not OptimSection's: tokenizers
train with a constant learning rate, no warmup, no weight decay and Adam's beta2 0.999 unless
told otherwise (the settings every shipped tokenizer and its figures in docs/benchmarks.md used).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmfm.train.config import OptimSection
from mmfm.typed_config import ConfigError, from_dict, read_sections, to_dict  # noqa: F401 (re-exported)

SECTIONS = ("tokenizer", "model", "data", "deepspeed", "optim", "train")
TOKENIZER_OPTIM = OptimSection(lr=1e-3, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.999,
                               eps=1e-8, clip=1.0)
DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


@dataclass
class DataConfig:
    shards: str = ""                 # shard spec (folder, brace pattern, glob) read with mmfm.data
    modality: str = ""               # only samples whose json 'modality' is this are used
    holdout_fraction: float = 0.1    # share of samples (by key hash) kept out of training for eval
    max_samples: int = 0             # 0 = all; otherwise the first N training samples (fast demos)


@dataclass
class TrainConfig:
    """The run's fields; unlike pretraining's TrainSection, batch_size is the global batch (split
    evenly over the ranks), since a tokenizer's step is defined by the batch it averages over."""
    out: str = "runs/tokenizer"      # checkpoints, logs, reconstructions and the saved tokenizer
    steps: int = 500
    batch_size: int = 16
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    keep_last: int = 2               # complete checkpoints kept
    threads: int = 0                 # torch threads (0 = leave torch's default)
    # Fine-tuning a saved tokenizer instead of training one from its seed: `init` is its folder (the
    # same registry name and architecture), `freeze` the parts left as they are (requires_grad off,
    # kept in eval mode so no codebook EMA or revival runs). Freezing encoder and quantizer keeps
    # every token the tokenizer gives, so models trained on its tokens stay valid: RobustTok's
    # plug-and-play decoder fine-tuning (configs/tokenizers/image_conv_vq_robust_decoder.yaml).
    init: str = ""
    freeze: list[str] = field(default_factory=list)


@dataclass
class TokenizerFile:
    """A parsed configs/tokenizers/<name>.yaml."""
    tokenizer: str
    model: object
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimSection = field(default_factory=lambda: dataclasses.replace(TOKENIZER_OPTIM))
    deepspeed: dict = field(default_factory=lambda: dict(DEFAULT_DEEPSPEED))
    deepspeed_path: str = ""
    path: str = ""


def optim_section(raw, where: str) -> OptimSection:
    """The file's `optim:` fields over TOKENIZER_OPTIM, type-checked as OptimSection."""
    given = from_dict(OptimSection, raw, where)
    return dataclasses.replace(TOKENIZER_OPTIM, **{k: getattr(given, k) for k in (raw or {})})


def load_config(path) -> TokenizerFile:
    from mmfm.tokenizers.registry import config_class
    from mmfm.train.config import read_deepspeed

    path = str(path)
    raw = read_sections(path, SECTIONS, files=("deepspeed",))   # resolved from the config's folder
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
    ds, ds_path = dict(DEFAULT_DEEPSPEED), ""
    if raw.get("deepspeed") is not None:
        ds, ds_path = read_deepspeed(raw["deepspeed"], f"{path}: deepspeed")
    optim = optim_section(raw.get("optim"), f"{path}: optim")
    for ok, fname, why in [(optim.lr > 0, "optim.lr", "must be > 0"),
                           (0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
                           (optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")]:
        if not ok:
            raise ConfigError(f"{path}: {fname}: {why}")
    return TokenizerFile(name, model, from_dict(DataConfig, raw.get("data"), f"{path}: data"),
                         from_dict(TrainConfig, raw.get("train"), f"{path}: train"), optim, ds, ds_path, path)
