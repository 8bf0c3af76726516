"""Quantizer modules built on mmfm.ops.quant (one small module per quantizer).

Every quantizer's forward returns a QuantizerOutput(quantized, indices, loss, metrics); each has
encode(z) -> indices, decode(indices) -> codes and a `codebook_size`, and saves / loads with
safetensors (`save_quantizer` / `load_quantizer`, or `module.save_safetensors(path)` and
`Class.load_safetensors(path)`), the constructor config stored as JSON in the header. Each is
registered in `QUANTIZERS` under a short name (vq, fsq, lfq, rvq, multiscale_rvq, dimwise, soft);
`build_quantizer({kind: NAME, **constructor arguments})` builds one from a config section.
"""
from mmfm.quantizers.base import QUANTIZERS, QuantizerOutput, Quantizer, build_quantizer, load_quantizer, save_quantizer
from mmfm.quantizers.dimwise import DimensionwiseQuantizer
from mmfm.quantizers.fsq import FSQ
from mmfm.quantizers.lfq import LFQ
from mmfm.quantizers.multiscale import MultiScaleResidualVQ
from mmfm.quantizers.rvq import ResidualVQ
from mmfm.quantizers.soft import SoftVQ
from mmfm.quantizers.vq import VectorQuantizer

__all__ = [
    "QUANTIZERS", "QuantizerOutput", "Quantizer", "build_quantizer", "save_quantizer", "load_quantizer",
    "VectorQuantizer", "FSQ", "LFQ", "ResidualVQ", "MultiScaleResidualVQ", "DimensionwiseQuantizer", "SoftVQ",
]
