"""Python face of the compiled ops (csrc/): one module per op family, each op with a
pure-torch reference beside it that runs when mmfm._C is absent."""
from mmfm._ext import compiled_ops, extension_loaded, load_error, with_cuda
from mmfm.ops import attention, cache, fake, linear, quant, sampling

# Load mmfm._C now so torch.ops.mmfm.* exist after `import mmfm`; a failure is recorded and
# reported once, by the first op that has to fall back to its reference. The fake (meta)
# implementations let torch.compile trace the ops without graph breaks (mmfm/ops/fake.py).
if extension_loaded():
    fake.register()

__all__ = ["attention", "cache", "fake", "linear", "quant", "sampling", "compiled_ops", "extension_loaded", "load_error", "with_cuda"]
