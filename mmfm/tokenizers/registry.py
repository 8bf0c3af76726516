"""Name -> tokenizer class and its config dataclass.

Each tokenizer module registers itself with `@register("name", ConfigClass)`; `import
mmfm.tokenizers` imports every module, so the registry is complete after that import. YAML
configs and saved tokenizers name the tokenizer by this string.
"""
from __future__ import annotations

_TOKENIZERS: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    def wrap(cls):
        if name in _TOKENIZERS:
            raise ValueError(f"tokenizer {name!r} registered twice")
        cls.registry_name = name
        cls.config_cls = config_cls
        _TOKENIZERS[name] = (cls, config_cls)
        return cls
    return wrap


def _ensure_loaded() -> None:
    import mmfm.tokenizers  # noqa: F401  (imports every tokenizer module, which registers it)


def available() -> list[str]:
    _ensure_loaded()
    return sorted(_TOKENIZERS)


def tokenizer_class(name: str) -> type:
    _ensure_loaded()
    if name not in _TOKENIZERS:
        raise KeyError(f"unknown tokenizer {name!r}; available: {', '.join(sorted(_TOKENIZERS))}")
    return _TOKENIZERS[name][0]


def config_class(name: str) -> type:
    return tokenizer_class(name).config_cls


def build_tokenizer(name: str, config):
    return tokenizer_class(name)(config)
