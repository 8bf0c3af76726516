"""Typed configs from YAML: dataclasses filled field by field, with errors that name the file
and the field (`configs/x.yaml: model.levels: expected list[int], got 'abc'`), so a typo never
silently falls back to a default. Shared by tokenizer, model and training configs.

Paths inside a config: a field that names another config file (a pretrain config's `model` and
`deepspeed`, say) is relative to the folder of the config that names it, so a recipe and the
files it names move together and work from any working directory; absolute paths are kept.
Data and output locations (`data.shards`, `train.out`, a `decoder` export) are the user's
workspace and stay relative to the working directory, as on the command line, and so do
overrides given on the command line. The configs shipped with mmfm (configs/ in the checkout,
mmfm/configs in an installed package) are found with `packaged_config`.
"""
from __future__ import annotations

import dataclasses
import os
import typing


class ConfigError(ValueError):
    pass


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value, tp, where: str):
    """value converted to type tp (int -> float allowed; nothing else coerced), or ConfigError."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, str):   # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string, not a float
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
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
    if origin is dict or tp is dict:
        key_tp, val_tp = typing.get_args(tp) or (None, None)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if key_tp is None:   # a bare `dict` field: any mapping, checked by its owner
            return dict(value)
        return {_check_value(k, key_tp, f"{where} (key {k!r})"): _check_value(v, val_tp, f"{where}.{k}")
                for k, v in value.items()}
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


def packaged_config(name: str = "") -> str:
    """The path of a config shipped with mmfm, e.g. packaged_config("models/small.yaml"); "" gives
    the folder. An installed wheel carries them as mmfm/configs (setup.py copies them in); a
    source checkout or editable install reads configs/ beside the package."""
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(folder):
            return os.path.join(folder, name) if name else folder
    raise ConfigError(f"mmfm's configs are missing: neither {package}/configs (installed) nor "
                      f"{os.path.dirname(package)}/configs (source checkout) exists; reinstall mmfm")


def relative_to_config(value, path):
    """A file named in config `path` (a string that is not absolute) as a path from the config's
    folder; anything else unchanged."""
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(str(path))), value))
    return value


def _resolve_file_fields(raw: dict, path: str, files: tuple[str, ...]) -> None:
    for dotted in files:
        *parents, last = dotted.split(".")
        d = raw
        for k in parents:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict) and last in d:
            d[last] = relative_to_config(d[last], path)


def read_sections(path, sections: tuple[str, ...], files: tuple[str, ...] = ()) -> dict:
    """The top-level mapping of YAML file `path`, whose keys must be among `sections`. `files`:
    the fields (dotted, e.g. "train.deepspeed") that name other files; their relative paths are
    resolved against the config's folder here, before any command-line override is applied."""
    import yaml

    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(sections)}")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown top-level field; expected {', '.join(sections)}")
    _resolve_file_fields(raw, path, files)
    return raw
