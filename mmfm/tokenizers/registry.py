"""Name -> tokenizer class and its config dataclass (one `mmfm.registry.Registry`).

Each tokenizer module registers itself with `@register("name", ConfigClass)`; a lookup imports
`mmfm.tokenizers` (every tokenizer module) first, so the registry is complete. YAML configs and
saved tokenizers name the tokenizer by this string, in their top-level `tokenizer` field.
"""
from __future__ import annotations

from mmfm.registry import Registry

TOKENIZERS = Registry("tokenizer", field="tokenizer", modules=("mmfm.tokenizers",))
register = TOKENIZERS.register


def available() -> list[str]:
    return TOKENIZERS.names()


def tokenizer_class(name: str) -> type:
    """Raises mmfm.registry.UnknownName (a ConfigError and a KeyError) listing the known names."""
    return TOKENIZERS.get(name).cls


def config_class(name: str) -> type:
    return TOKENIZERS.get(name).config_cls


def build_tokenizer(name: str, config):
    return TOKENIZERS.build(name, config)
