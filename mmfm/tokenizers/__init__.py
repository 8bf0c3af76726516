"""Tokenizers per modality, with their training code (see docs/tokenizers.md).

Importing this package registers every tokenizer (mmfm.tokenizers.registry); build one with
`build_tokenizer(name, config)`, read a YAML with `load_config(path)`, reload a saved one with
`load_tokenizer(dir)`.
"""
from mmfm.tokenizers import (audio, hf_text, image, physics, shape3d, superbpe, text, tokenbridge,  # noqa: F401
                             video)  # (each registers its tokenizers)
from mmfm.tokenizers.base import NeuralTokenizer, StepOutput, load_tokenizer
from mmfm.tokenizers.config import ConfigError, load_config
from mmfm.tokenizers.registry import available, build_tokenizer, tokenizer_class

__all__ = ["NeuralTokenizer", "StepOutput", "load_tokenizer", "ConfigError", "load_config", "available",
           "build_tokenizer", "tokenizer_class"]
