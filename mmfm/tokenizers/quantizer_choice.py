"""Build the quantizer a tokenizer config asks for, by name, from mmfm.quantizers.

    vq   VectorQuantizer(latent_dim, codebook_size)      tokens: code ids
    fsq  FSQ(fsq_levels)                                 latent_dim must be len(fsq_levels)
    lfq  LFQ(latent_dim)                                 2^latent_dim codes
    none no quantization: a continuous autoencoder (for the TokenBridge path)
"""
from __future__ import annotations

import math

from mmfm.quantizers import FSQ, LFQ, VectorQuantizer

KINDS = ("vq", "fsq", "lfq", "none")


def check_quantizer_fields(kind: str, latent_dim: int, codebook_size: int, fsq_levels) -> None:
    """Raise ValueError('<field>: ...') for an inconsistent choice (config.py prefixes the file)."""
    if kind not in KINDS:
        raise ValueError(f"quantizer: must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "fsq" and len(fsq_levels) != latent_dim:
        raise ValueError(f"fsq_levels: FSQ needs one level per latent channel: latent_dim is {latent_dim}, "
                         f"fsq_levels has {len(fsq_levels)}")
    if kind == "lfq" and not 1 <= latent_dim <= 20:
        raise ValueError(f"latent_dim: LFQ codes 2^latent_dim ids, keep latent_dim in [1, 20], got {latent_dim}")
    if kind == "vq" and codebook_size < 2:
        raise ValueError(f"codebook_size: must be >= 2, got {codebook_size}")


def make_quantizer(kind: str, latent_dim: int, codebook_size: int, fsq_levels, seed: int = 0):
    check_quantizer_fields(kind, latent_dim, codebook_size, fsq_levels)
    if kind == "vq":
        return VectorQuantizer(latent_dim, codebook_size, seed=seed)
    if kind == "fsq":
        return FSQ(list(fsq_levels))
    if kind == "lfq":
        return LFQ(latent_dim, exact_entropy=latent_dim <= 16)
    return None


def codebook_size_of(kind: str, latent_dim: int, codebook_size: int, fsq_levels) -> int:
    if kind == "vq":
        return codebook_size
    if kind == "fsq":
        return math.prod(fsq_levels)
    if kind == "lfq":
        return 2 ** latent_dim
    raise ValueError("quantizer: 'none' has no tokens (a continuous autoencoder; see mmfm.tokenizers.tokenbridge)")
