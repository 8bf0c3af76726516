"""mmfm: multimodal foundation models over one shared token vocabulary."""
__version__ = "0.1.0"

from mmfm import ops  # noqa: E402  (loads mmfm._C if built; warns once on first use otherwise)

__all__ = ["ops", "__version__"]


def load(folder: str):
    """An exported model folder (mmfm export) -> mmfm Transformer in eval mode."""
    from mmfm.export import load as _load

    return _load(folder)


__all__.append("load")
