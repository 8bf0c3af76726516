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

import dataclasses
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    pass


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
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    threads: int = 0                 # torch threads (0 = leave torch's default)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value, tp, where: str):
    """value converted to type tp (int -> float allowed; nothing else coerced), or ConfigError."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected list[{_type_name(inner)}], got {value!r}")
        return [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls, d, where: str):
    """Build dataclass `cls` from a mapping, checking field names and types. `where` prefixes errors."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field; {cls.__name__} has: {', '.join(sorted(names))}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


@dataclass
class TokenizerFile:
    """A parsed configs/tokenizers/<name>.yaml."""
    tokenizer: str
    model: object
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: str = ""


def load_config(path) -> TokenizerFile:
    import yaml

    from mmfm.tokenizers.registry import config_class

    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'tokenizer', 'model', 'data', 'train'")
    unknown = sorted(set(raw) - {"tokenizer", "model", "data", "train"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown top-level field; expected tokenizer, model, data, train")
    name = raw.get("tokenizer")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: tokenizer: expected the tokenizer's registry name (a string), got {name!r}")
    try:
        model_cls = config_class(name)
    except KeyError as exc:
        raise ConfigError(f"{path}: tokenizer: {exc.args[0]}") from None
    model = from_dict(model_cls, raw.get("model"), f"{path}: model")
    if hasattr(model, "validate"):
        try:
            model.validate()
        except ValueError as exc:
            raise ConfigError(f"{path}: model.{exc}") from None
    return TokenizerFile(name, model, from_dict(DataConfig, raw.get("data"), f"{path}: data"),
                         from_dict(TrainConfig, raw.get("train"), f"{path}: train"), path)
