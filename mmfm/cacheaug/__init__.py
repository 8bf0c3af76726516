"""Cache augmentation (docs/cacheaug.md): a coprocessor reads the frozen decoder's KV cache and
appends N latent embeddings to it. `augment` is the generation hook; `load_coprocessor` reads a
trained one; `mmfm cacheaug train|eval` (mmfm/cacheaug/commands.py) trains and measures it."""
from mmfm.cacheaug.coprocessor import (Coprocessor, PrefixCache, augment, load_coprocessor, save_coprocessor,
                                    weights_hash)
from mmfm.cacheaug.generate import cached_ahead_nll, generate, prefill

__all__ = ["Coprocessor", "PrefixCache", "augment", "cached_ahead_nll", "generate", "load_coprocessor",
           "prefill", "save_coprocessor", "weights_hash"]
