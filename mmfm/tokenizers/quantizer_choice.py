"""The quantizer an image tokenizer config names in its `quantizer` field, built through the
quantizer registry (mmfm.quantizers.QUANTIZERS) from the tokenizer's own fields:

    vq   VectorQuantizer(latent_dim, codebook_size)      tokens: code ids
    fsq  FSQ(fsq_levels)                                 latent_dim must be len(fsq_levels)
    lfq  LFQ(latent_dim)                                 2^latent_dim codes
    none no quantization: a continuous autoencoder (for the TokenBridge path)

Only these: the other registered quantizers need fields these configs do not have (levels of a
residual VQ, scales of a multi-scale one).
"""
from __future__ import annotations

import math

from mmfm.quantizers import QUANTIZERS

NONE = "none"
KINDS = ("vq", "fsq", "lfq", NONE)


def _arguments(kind: str, latent_dim: int, codebook_size: int, fsq_levels, seed: int) -> dict:
    """The registered quantizer's constructor arguments from the tokenizer fields."""
    if kind == "vq":
        return {"dim": latent_dim, "codebook_size": codebook_size, "seed": seed}
    if kind == "fsq":
        return {"levels": list(fsq_levels)}
    return {"dim": latent_dim, "exact_entropy": latent_dim <= 16}    # lfq


def check_quantizer_fields(kind: str, latent_dim: int, codebook_size: int, fsq_levels) -> None:
    """Raise ValueError('<field>: ...') for an inconsistent choice (config.py prefixes the file)."""
    if kind not in KINDS:
        raise ValueError(f"quantizer: unknown quantizer {kind!r}; expected one of: {', '.join(sorted(KINDS))}")
    if kind == "fsq" and len(fsq_levels) != latent_dim:
        raise ValueError(f"fsq_levels: FSQ needs one level per latent channel: latent_dim is {latent_dim}, "
                         f"fsq_levels has {len(fsq_levels)}")
    if kind == "lfq" and not 1 <= latent_dim <= 20:
        raise ValueError(f"latent_dim: LFQ codes 2^latent_dim ids, keep latent_dim in [1, 20], got {latent_dim}")
    if kind == "vq" and codebook_size < 2:
        raise ValueError(f"codebook_size: must be >= 2, got {codebook_size}")


def make_quantizer(kind: str, latent_dim: int, codebook_size: int, fsq_levels, seed: int = 0):
    check_quantizer_fields(kind, latent_dim, codebook_size, fsq_levels)
    if kind == NONE:
        return None
    return QUANTIZERS.build(kind, _arguments(kind, latent_dim, codebook_size, fsq_levels, seed))


def codebook_size_of(kind: str, latent_dim: int, codebook_size: int, fsq_levels) -> int:
    if kind == "vq":
        return codebook_size
    if kind == "fsq":
        return math.prod(fsq_levels)
    if kind == "lfq":
        return 2 ** latent_dim
    raise ValueError("quantizer: 'none' has no tokens (a continuous autoencoder; see mmfm.tokenizers.tokenbridge)")
