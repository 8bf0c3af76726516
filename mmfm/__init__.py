"""mmfm: multimodal foundation models over one shared token vocabulary."""
__version__ = "0.1.0"

from mmfm import ops  # noqa: E402  (loads mmfm._C if built; warns once on first use otherwise)

__all__ = ["ops", "__version__", "load", "Bundle"]


def load(folder: str):
    """An exported model folder (mmfm export) -> mmfm Transformer in eval mode."""
    from mmfm.models.io import load as _load

    return _load(folder)


def __getattr__(name: str):
    # lazy: `mmfm.Bundle.load(DIR).generate(...)` without importing the decoder and the tokenizers on
    # `import mmfm`. There is no function `mmfm.generate`: importing the package mmfm.generate rebinds
    # that attribute to the package, so a function of the same name would vanish on first import.
    if name == "Bundle":
        from mmfm.generate.bundle import Bundle

        return Bundle
    raise AttributeError(f"module 'mmfm' has no attribute {name!r}")
