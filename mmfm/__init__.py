"""mmfm: multimodal foundation models over one shared token vocabulary."""
__version__ = "0.1.0"

from mmfm import ops  # noqa: E402  (loads mmfm._C if built; warns once on first use otherwise)

__all__ = ["ops", "__version__"]
