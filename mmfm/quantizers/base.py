"""What every quantizer shares: the result dataclass, argument checks, batch usage metrics, and
saving / loading with safetensors (the constructor config travels as JSON in the header).

No pickle anywhere: `load_quantizer` rebuilds only classes registered in `QUANTIZERS` (each
quantizer module registers its class by a short name, `vq`, `fsq`, ..., the name tokenizer configs
use), from their JSON config, then loads the tensors with `load_state_dict(strict=True)`. Files
record the registry name; the class-name aliases read files written before the registry.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmfm.registry import Registry

FORMAT_VERSION = "1"
# No config dataclass: a quantizer's constructor arguments are its config (saved as JSON).
QUANTIZERS = Registry("quantizer", field="kind", modules=("mmfm.quantizers",))


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns.

    quantized: same shape as the input, straight-through (forward value = the codes, gradient
        flows to the input as if quantization were the identity), except SoftVQ whose output is
        differentiable on its own.
    indices: int64 code ids ([...] for one codebook, [..., M] for M residual levels,
        [..., C] per channel for DimensionwiseQuantizer, a list of [B, n_s] per scale for
        MultiScaleResidualVQ).
    loss: scalar tensor to add to the training loss (0 when the quantizer has none).
    metrics: detached scalar tensors, at least `usage` (fraction of the codebook used in this
        batch) and `perplexity` (exp of the entropy of this batch's code histogram).
    """

    quantized: torch.Tensor
    indices: Any
    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)


def check_int(value, name: str, owner: str, minimum: int, maximum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: argument '{name}' must be an integer {bound}, got {value!r}")
    return int(value)


def check_float(value, name: str, owner: str, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: argument '{name}' must be a number, got {value!r}") from None
    if not (v > low if low_open else v >= low) or not (v < high if high_open else v <= high) or math.isnan(v):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{owner}: argument '{name}' must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_last_dim(z, dim: int, owner: str, name: str = "z") -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{owner}: argument '{name}' must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{owner}: argument '{name}' must be a floating-point tensor, got {z.dtype}")
    if z.dim() < 1 or z.shape[-1] != dim:
        raise ValueError(f"{owner}: argument '{name}' must have shape [..., {dim}] (dim={dim}), got {tuple(z.shape)}")


def check_indices(indices, owner: str, size: int, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"{owner}: argument '{name}' must be an int64 tensor")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"{owner}: every entry of '{name}' must be in [0, {size})")


def usage_metrics(indices: torch.Tensor, size: int) -> dict:
    """Fraction of `size` codes used by `indices`, and the perplexity exp(H) of their histogram."""
    flat = indices.detach().reshape(-1)
    if flat.numel() == 0:
        zero = torch.zeros((), device=flat.device)
        return {"usage": zero, "perplexity": zero}
    if size <= (1 << 22):
        counts = torch.bincount(flat, minlength=size)
        used = (counts > 0).sum()
        counts = counts[counts > 0]
    else:  # implicit codebooks (FSQ, LFQ) can be far larger than a histogram
        counts = torch.unique(flat, return_counts=True)[1]
        used = torch.tensor(counts.numel(), device=flat.device)
    return {"usage": used.float() / size, "perplexity": perplexity_of(counts)}


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum p log p) of a histogram (0 for an empty one)."""
    counts = counts.detach().double()
    total = counts.sum()
    if float(total) <= 0:
        return torch.zeros((), device=counts.device)
    p = counts[counts > 0] / total
    return torch.exp(-(p * p.log()).sum()).float()


def zero_loss(ref: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=ref.device, dtype=torch.float32)


def call_sync(sync_fn: Callable | None, t: torch.Tensor) -> torch.Tensor:
    """Apply a user's cross-rank reduction: it may reduce in place (returning None, like
    torch.distributed.all_reduce) or return the reduced tensor."""
    if sync_fn is None:
        return t
    out = sync_fn(t)
    return out if isinstance(out, torch.Tensor) else t


class Quantizer(nn.Module):
    """Base class: remembers the constructor config and saves / loads itself with safetensors.

    Subclasses call `self._remember(**kwargs)` with their JSON-serialisable constructor
    arguments; anything that is not serialisable (a `sync_fn` callable) is left out and passed
    again to `load_quantizer(path, sync_fn=...)`.
    """

    def _remember(self, **config) -> None:
        json.dumps(config)  # fail at construction, not at save time
        self._config = config

    @property
    def config(self) -> dict:
        return json.loads(json.dumps(self._config))

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    def encode(self, z: torch.Tensor):
        raise NotImplementedError

    def decode(self, indices):
        raise NotImplementedError

    def save_safetensors(self, path) -> None:
        save_quantizer(self, path)

    @classmethod
    def load_safetensors(cls, path, device="cpu", **overrides) -> "Quantizer":
        module = load_quantizer(path, device=device, **overrides)
        if not isinstance(module, cls):
            raise ValueError(f"{cls.__name__}.load_safetensors: '{path}' holds a {type(module).__name__}")
        return module


def build_quantizer(section, where: str = "quantizer") -> Quantizer:
    """A config section naming its quantizer in `kind`, the rest constructor arguments
    ({kind: vq, dim: 8, codebook_size: 512}) -> the module. `where` names the section in errors."""
    kwargs = QUANTIZERS.config_from_dict(section, where)
    return QUANTIZERS.build(section["kind"], kwargs)


def save_quantizer(module: Quantizer, path) -> None:
    """Write module.state_dict() to `path` with safetensors; the class name and constructor
    config go into the header metadata so that `load_quantizer` can rebuild the module."""
    from safetensors.torch import save_file

    if not isinstance(module, Quantizer):
        raise TypeError(f"save_quantizer: argument 'module' must be an mmfm Quantizer, got {type(module).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    metadata = {"format": "pt", "mmfm.quantizer": type(module).registry_name,
                "mmfm.config": json.dumps(module._config, sort_keys=True), "mmfm.format_version": FORMAT_VERSION}
    save_file(tensors, str(path), metadata=metadata)


def load_quantizer(path, device="cpu", **overrides) -> Quantizer:
    """Rebuild a quantizer saved by `save_quantizer`. `overrides` replace or add constructor
    arguments (e.g. `sync_fn=lambda t: torch.distributed.all_reduce(t)`, which is not saved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    name = meta.get("mmfm.quantizer")
    try:
        entry = QUANTIZERS.get(name)
    except KeyError:
        raise ValueError(f"load_quantizer: '{path}' has no known mmfm quantizer in its metadata (found {name!r}); "
                         f"known: {', '.join(QUANTIZERS.names())}") from None
    config = json.loads(meta["mmfm.config"])
    config.update(overrides)
    module = entry.cls(**config)
    module.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return module.to(device)
