"""Python face of the compiled ops (csrc/): one module per op family, each op with a
pure-torch reference beside it that runs when mmfm._C is absent."""
from mmfm._ext import compiled_ops, extension_loaded, load_error, with_cuda
from mmfm.ops import quant, sampling

__all__ = ["quant", "sampling", "compiled_ops", "extension_loaded", "load_error", "with_cuda"]
