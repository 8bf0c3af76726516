"""How components are declared: one `Registry` per kind of component (tokenizers, quantizers,
objectives, model architectures), each mapping the name a config file uses to a class and its
config dataclass.

    OBJECTIVES = Registry("objective", field="kind", default="ar", modules=("mmfm.objectives",))

    @OBJECTIVES.register("masked", ObjectiveConfig)
    class Masked(Objective): ...

    cfg = OBJECTIVES.config_from_dict({"kind": "masked", "input_fraction": 0.5}, "run.yaml: objective")
    objective = OBJECTIVES.build(cfg.kind, cfg, vocab)

`field` is the config field that names the component; a name that is not registered fails with
that field and every valid name (`run.yaml: objective.kind: unknown objective 'mlm'; expected one
of: ar, hybrid, masked`). A registry imports its `modules` before the first lookup, because
classes register themselves when their module is imported and a lookup must see all of them.

A class registered without a config dataclass (the quantizers, whose constructor arguments are
their saved config) takes its config as keyword arguments.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from mmfm.typed_config import ConfigError, from_dict


class UnknownName(ConfigError, KeyError):
    """A name no class is registered under. A ConfigError (a ValueError) like every other config
    mistake, and a KeyError so that code written against the older per-package lookups, which
    raised KeyError, still catches it."""

    def __str__(self) -> str:  # KeyError's __str__ would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config_cls: type | None


class Registry:
    def __init__(self, kind: str, field: str, default: str | None = None, modules: tuple[str, ...] = ()):
        """kind: what is registered, as error messages say it ("tokenizer"); field: the config
        field whose value is the name ("kind"); default: the name when a section leaves `field`
        out; modules: imported before the first lookup so that every class has registered."""
        self.kind, self.field, self.default, self.modules = kind, field, default, modules
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, config_cls: type | None = None, aliases: tuple[str, ...] = ()) -> Callable:
        """Class decorator: file `cls` under `name` (and `aliases`, older names that configs or
        saved files may still use); sets `cls.registry_name` and `cls.config_cls`."""
        def wrap(cls):
            for n in (name, *aliases):
                if n in self._entries or n in self._aliases:
                    raise ValueError(f"{self.kind} {n!r} registered twice")
            cls.registry_name = name
            cls.config_cls = config_cls
            self._entries[name] = Entry(name, cls, config_cls)
            self._aliases.update({a: name for a in aliases})
            return cls
        return wrap

    def _load(self) -> None:
        for m in self.modules:
            importlib.import_module(m)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: Any, where: str = "") -> Entry:
        """The entry registered under `name` (or one of its aliases). `where` prefixes the field
        in the error, e.g. "run.yaml: objective." -> "run.yaml: objective.kind: unknown ..."."""
        self._load()
        key = self._aliases.get(name, name) if isinstance(name, str) else None
        if key not in self._entries:
            what = "missing" if name is None else f"unknown {self.kind} {name!r}"
            raise UnknownName(f"{where}{self.field}: {what}; expected one of: {', '.join(sorted(self._entries))}")
        return self._entries[key]

    def config_from_dict(self, section, where: str):
        """A config section that names its component in `field` -> the checked config: the
        dataclass of the named entry (with `field` among its fields), or, for an entry without a
        config dataclass, the section minus `field` as keyword arguments checked against the
        constructor's signature. `where` names the section in errors ("run.yaml: objective")."""
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {section!r}")
        name = section.get(self.field, self.default)
        entry = self.get(name, f"{where}.")
        if entry.config_cls is not None:
            return from_dict(entry.config_cls, section, where)
        kwargs = {k: v for k, v in section.items() if k != self.field}
        params = inspect.signature(entry.cls).parameters
        accepted = [p for p in params if params[p].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)]
        for k in kwargs:
            if k not in accepted:
                raise ConfigError(f"{where}.{k}: unknown field; {self.kind} {name!r} ({entry.cls.__name__}) takes: "
                                  f"{', '.join([self.field, *accepted])}")
        return kwargs

    def build(self, name: str, config, *args, where: str = "", **kwargs):
        """An instance of the class registered under `name`: cls(config, *args, **kwargs), or
        cls(**config, **kwargs) for an entry without a config dataclass."""
        entry = self.get(name, where)
        if entry.config_cls is None:
            return entry.cls(*args, **{**dict(config or {}), **kwargs})
        return entry.cls(config, *args, **kwargs)
