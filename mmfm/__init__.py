"""mmfm: multimodal foundation models over one shared token vocabulary."""
__version__ = "0.1.0"

from mmfm import ops  # noqa: E402  (loads mmfm._C if built; warns once on first use otherwise)

__all__ = ["ops", "__version__"]


def load(folder: str):
    """An exported model folder (mmfm export) -> mmfm Transformer in eval mode."""
    from mmfm.models.io import load as _load

    return _load(folder)


__all__.append("load")


def __getattr__(name: str):
    # lazy: `mmfm.generate(...)` without importing the decoder (and its deps) on `import mmfm`;
    # the package mmfm.generate is itself callable (see mmfm/generate/__init__.py)
    if name == "generate":
        import importlib

        return importlib.import_module("mmfm.generate")
    raise AttributeError(f"module 'mmfm' has no attribute {name!r}")


__all__.append("generate")
