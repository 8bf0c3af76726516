"""Key-value cache operations shared by generation (mmfm/generate) and cache augmentation
(mmfm/cacheaug). A cache tensor is [B, H, T, D] (one layer's keys or values; T = capacity in slots);
row b holds `lengths[b]` valid entries in slots [0, lengths[b]), contiguous, with no padding.

    kv_append(cache, new, starts, counts)     write new[b, :, :counts[b]] at slots starts[b]...
    kv_insert(cache, lengths, at, entries)    open a gap of N slots at slot at[b] and fill it
    kv_gather_rows(cache, rows)               cache[rows] (beam / speculative reordering)

Each runs the compiled op (torch.ops.mmfm.*, csrc/cache) when mmfm._C is loaded, else the
pure-torch reference beside it (`*_reference`, one warning says why). Both validate the same
way and raise the same errors, naming the argument (and the row, for value errors); a call
that raises has written nothing. The cache must be a contiguous float32, float16 or bfloat16
tensor: the ops write it in place. `new` / `entries` may be any float dtype and layout (they
are cast to the cache's dtype; the compiled op reads strided sources directly as long as D is
the innermost dim). Per-row arguments are Python ints or 1-d integer tensors [B], moved to the
cache's device. The ops are not differentiable: a cache is a buffer. Details: docs/ops_cache.md.
"""
from __future__ import annotations

from numbers import Integral

import torch

from mmfm._ext import compiled, extension_loaded

CACHE_TYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---------------------------------------------------------------------------- validation
def _check_cache(cache, op: str) -> tuple[int, int, int, int]:
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument 'cache' must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype not in CACHE_TYPES:
        raise TypeError(f"mmfm.{op}: argument 'cache' must be float32, float16 or bfloat16, got {cache.dtype}")
    if cache.dim() != 4:
        raise ValueError(f"mmfm.{op}: argument 'cache' must have shape [B, H, T, D] (4 dims), got "
                         f"{tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError(f"mmfm.{op}: argument 'cache' must be contiguous (strides {cache.stride()} for shape "
                         f"{tuple(cache.shape)}); the op writes its [B, H, T, D] slots in place")
    return tuple(cache.shape)


def _source(src, cache: torch.Tensor, op: str, name: str) -> torch.Tensor:
    """`src` [B, H, L, D] as the kernel reads it: the cache's dtype, unit stride along D."""
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a torch.Tensor, got {type(src).__name__}")
    if not src.is_floating_point():
        raise TypeError(f"mmfm.{op}: argument '{name}' must be a float tensor, got {src.dtype}")
    B, H, _, D = cache.shape
    shape = src.shape
    if len(shape) != 4 or shape[0] != B or shape[1] != H or shape[3] != D:
        raise ValueError(f"mmfm.{op}: argument '{name}' must have shape [B={B}, H={H}, L, D={D}] to match 'cache', "
                         f"got {tuple(shape)}")
    if src.device != cache.device:
        raise ValueError(f"mmfm.{op}: arguments 'cache' ({cache.device}) and '{name}' ({src.device}) must be on the "
                         "same device")
    if src.requires_grad:
        src = src.detach()
    if src.dtype != cache.dtype:
        src = src.to(cache.dtype)
    if D > 1 and src.stride(3) != 1:
        src = src.contiguous()
    return src


def _rows_arg(x, B: int, op: str, name: str, device) -> torch.Tensor:
    """A per-row argument as an int64 tensor [B] on `device`."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _INT_TYPES:
            raise TypeError(f"mmfm.{op}: argument '{name}' must hold integers, got {x.dtype}")
        if x.dim() != 1 or x.shape[0] != B:
            raise ValueError(f"mmfm.{op}: argument '{name}' must be an int or a tensor of shape [B={B}], got shape "
                             f"{tuple(x.shape)}")
        if x.dtype == torch.long and x.device == device:
            return x   # the decode loop's case: no call into torch
        return x.to(device=device, dtype=torch.long)
    if isinstance(x, Integral) and not isinstance(x, bool):
        return torch.full((B,), int(x), dtype=torch.long, device=device)
    raise TypeError(f"mmfm.{op}: argument '{name}' must be an int or an integer tensor [B={B}], got "
                    f"{type(x).__name__}")


def _fast_compiled(cache: torch.Tensor) -> bool:
    """The common case without a call into _ext.compiled: a CPU cache with mmfm._C loaded."""
    return cache.is_cpu and extension_loaded()


def _supported(cache: torch.Tensor) -> bool:
    """Devices the compiled ops take (others, e.g. meta, run the reference)."""
    return cache.is_cpu or cache.is_cuda


def _first_bad(bad: torch.Tensor) -> int:
    """Index of the first True of a bool [B], or -1 (one host read)."""
    if not bool(bad.any()):
        return -1
    return int(bad.nonzero()[0, 0])


# ----------------------------------------------------------------------------- references
def _append_checks(T: int, L: int, starts: torch.Tensor, counts: torch.Tensor) -> None:
    op = "kv_append"
    b = _first_bad(starts < 0)
    if b >= 0:
        raise ValueError(f"mmfm.{op}: argument 'starts' is {int(starts[b])} for row {b}; it must be >= 0")
    b = _first_bad((counts < 0) | (counts > L))
    if b >= 0:
        raise ValueError(f"mmfm.{op}: argument 'counts' is {int(counts[b])} for row {b}; it must lie in [0, L={L}]")
    b = _first_bad(starts + counts > T)
    if b >= 0:
        raise ValueError(f"mmfm.{op}: row {b}: starts + counts = {int(starts[b])} + {int(counts[b])} exceeds the "
                         f"cache capacity T={T}; nothing was written")


def _append_reference(cache, new, starts, counts) -> torch.Tensor:
    B, H, T, D = cache.shape
    L = new.shape[2]
    counts = torch.full_like(starts, L) if counts is None else counts
    _append_checks(T, L, starts, counts)
    i = torch.arange(L, device=cache.device)
    valid = i[None, :] < counts[:, None]                       # [B, L]
    b_idx = torch.arange(B, device=cache.device)[:, None].expand(B, L)[valid]
    slot = (starts[:, None] + i[None, :])[valid]
    cache.transpose(1, 2)[b_idx, slot] = new.transpose(1, 2)[valid].to(cache.dtype)
    return cache


def kv_append_reference(cache: torch.Tensor, new: torch.Tensor, starts, counts=None) -> torch.Tensor:
    """In place: cache[b, :, starts[b] + i] = new[b, :, i] for i < counts[b] (default all L).
    new is [B, H, L, D]. Returns cache. Pure torch (advanced-index assignment)."""
    op = "kv_append"
    B = _check_cache(cache, op)[0]
    new = _source(new, cache, op, "new")
    starts = _rows_arg(starts, B, op, "starts", cache.device)
    counts = None if counts is None else _rows_arg(counts, B, op, "counts", cache.device)
    return _append_reference(cache, new, starts, counts)


def _insert_reference(cache, lengths, at, entries) -> torch.Tensor:
    op = "kv_insert"
    B, H, T, D = cache.shape
    N = entries.shape[2]
    b = _first_bad((lengths < 0) | (lengths > T))
    if b >= 0:
        raise ValueError(f"mmfm.{op}: argument 'lengths' is {int(lengths[b])} for row {b}; it must lie in [0, T={T}]")
    b = _first_bad((at < 0) | (at > lengths))
    if b >= 0:
        raise ValueError(f"mmfm.{op}: argument 'at' is {int(at[b])} for row {b}; it must lie in "
                         f"[0, lengths[{b}]={int(lengths[b])}]")
    b = _first_bad(lengths + N > T)
    if b >= 0:
        raise ValueError(f"mmfm.{op}: row {b}: lengths + N = {int(lengths[b])} + {N} exceeds the cache capacity "
                         f"T={T}; nothing was written")
    for b in range(B):
        a, n = int(at[b]), int(lengths[b])
        if n > a:
            cache[b, :, a + N:n + N] = cache[b, :, a:n].clone()
        cache[b, :, a:a + N] = entries[b].to(cache.dtype)
    return cache


def kv_insert_reference(cache: torch.Tensor, lengths, at, entries: torch.Tensor) -> torch.Tensor:
    """In place: for each row, move slots [at[b], lengths[b]) right by N and write entries[b]
    ([H, N, D]) into slots [at[b], at[b] + N). The caller adds N to its lengths. Returns cache.
    Pure torch (a slice copy through a clone per row)."""
    op = "kv_insert"
    B = _check_cache(cache, op)[0]
    entries = _source(entries, cache, op, "entries")
    lengths = _rows_arg(lengths, B, op, "lengths", cache.device)
    at = _rows_arg(at, B, op, "at", cache.device)
    return _insert_reference(cache, lengths, at, entries)


def _gather_rows_arg(rows, cache: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"mmfm.{op}: argument 'rows' must be a 1-d integer tensor, got {type(rows).__name__}")
    if rows.dtype not in _INT_TYPES:
        raise TypeError(f"mmfm.{op}: argument 'rows' must hold integers, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"mmfm.{op}: argument 'rows' must have shape [R] (1 dim), got {tuple(rows.shape)}")
    return rows.to(device=cache.device, dtype=torch.long)


def _gather_reference(cache, rows) -> torch.Tensor:
    B = cache.shape[0]
    r = _first_bad((rows < 0) | (rows >= B))
    if r >= 0:
        raise ValueError(f"mmfm.kv_gather_rows: argument 'rows' holds {int(rows[r])} at position {r}; rows must lie "
                         f"in [0, B={B})")
    return cache.index_select(0, rows)


def kv_gather_rows_reference(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A new [len(rows), H, T, D] tensor: cache[rows]. Pure torch (index_select)."""
    op = "kv_gather_rows"
    _check_cache(cache, op)
    return _gather_reference(cache, _gather_rows_arg(rows, cache, op))


# -------------------------------------------------------------------------------------- ops
def kv_append(cache: torch.Tensor, new: torch.Tensor, starts, counts=None) -> torch.Tensor:
    """In place: cache[b, :, starts[b] + i] = new[b, :, i] for i < counts[b] (default: all L
    slots of new [B, H, L, D]). starts / counts: ints or integer tensors [B]. Returns cache.

    Raises ValueError (naming the argument and the row, writing nothing) when starts[b] < 0,
    counts[b] is outside [0, L] or starts[b] + counts[b] > T. Compiled: one memcpy per
    (row, head) on the CPU (one per slot when new's slots are strided); on CUDA a validation
    kernel then a grid-stride copy in 16-byte units. Costs O(sum(counts) H D) bytes moved.
    """
    op = "kv_append"
    B = _check_cache(cache, op)[0]
    new = _source(new, cache, op, "new")
    starts = _rows_arg(starts, B, op, "starts", cache.device)
    counts = None if counts is None else _rows_arg(counts, B, op, "counts", cache.device)
    if _fast_compiled(cache) or (_supported(cache) and compiled(cache)):   # compiled() warns once
        torch.ops.mmfm.kv_append(cache, new, starts, counts)
        return cache
    return _append_reference(cache, new, starts, counts)


def kv_insert(cache: torch.Tensor, lengths, at, entries: torch.Tensor) -> torch.Tensor:
    """In place: for each row b, slots [at[b], lengths[b]) move right by N and entries[b]
    ([H, N, D] of entries [B, H, N, D]) fill slots [at[b], at[b] + N). The caller adds N to its
    lengths. lengths / at: ints or integer tensors [B]. Returns cache.

    Raises ValueError (naming the argument and the row, writing nothing) when lengths[b] is
    outside [0, T], at[b] outside [0, lengths[b]] or lengths[b] + N > T. Compiled: one memmove
    (overlap-safe) and one memcpy per (row, head) on the CPU; on CUDA one block per
    (row, head) shifts the slots in register tiles from the end down, then fills the gap.
    Costs O(sum(lengths - at + N) H D) bytes moved.
    """
    op = "kv_insert"
    B = _check_cache(cache, op)[0]
    entries = _source(entries, cache, op, "entries")
    lengths = _rows_arg(lengths, B, op, "lengths", cache.device)
    at = _rows_arg(at, B, op, "at", cache.device)
    if _fast_compiled(cache) or (_supported(cache) and compiled(cache)):   # compiled() warns once
        torch.ops.mmfm.kv_insert(cache, lengths, at, entries)
        return cache
    return _insert_reference(cache, lengths, at, entries)


def kv_gather_rows(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A new [R, H, T, D] tensor whose row r is cache[rows[r]] (beam reordering, CFG row
    duplication); rows: a 1-d integer tensor [R] with entries in [0, B) (repeats allowed).

    Compiled: one memcpy per (output row, head) (CPU), a grid-stride copy in 16-byte units
    (CUDA). Costs O(R H T D) bytes moved.
    """
    op = "kv_gather_rows"
    _check_cache(cache, op)
    rows = _gather_rows_arg(rows, cache, op)
    if _fast_compiled(cache) or (_supported(cache) and compiled(cache)):   # compiled() warns once
        return torch.ops.mmfm.kv_gather_rows(cache, rows)
    return _gather_reference(cache, rows)


__all__ = ["kv_append", "kv_insert", "kv_gather_rows", "kv_append_reference", "kv_insert_reference",
           "kv_gather_rows_reference", "CACHE_TYPES"]
