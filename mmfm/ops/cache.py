"""Key-value cache operations shared by generation (mmfm/generate) and cache augmentation
(mmfm/cache). A cache tensor is [B, H, T, D] (one layer's keys or values; T = capacity in slots);
row b holds `lengths[b]` valid entries in slots [0, lengths[b]), contiguous, with no padding.

    kv_append(cache, new, starts, counts)     write new[b, :, :counts[b]] at slots starts[b]...
    kv_insert(cache, lengths, at, entries)    open a gap of N slots at slot at[b] and fill it
    kv_gather_rows(cache, rows)               cache[rows] (beam / speculative reordering)

These are the pure-torch references; compiled kernels (csrc/cache) replace them when built, with
the same signatures and in-place semantics.
"""
from __future__ import annotations

import torch


def _check_cache(cache: torch.Tensor, op: str, name: str = "cache") -> None:
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-d tensor [B, H, T, D], got "
                         f"{getattr(cache, 'shape', type(cache).__name__)}")


def _rows_arg(x, B: int, op: str, name: str, device) -> torch.Tensor:
    if isinstance(x, int):
        return torch.full((B,), x, dtype=torch.long, device=device)
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"{op}: {name} must be an int or a 1-d tensor of {B} row values, got "
                         f"{getattr(x, 'shape', x)}")
    return x.to(device=device, dtype=torch.long)


def kv_append_reference(cache: torch.Tensor, new: torch.Tensor, starts, counts=None) -> torch.Tensor:
    """In place: cache[b, :, starts[b] + i] = new[b, :, i] for i < counts[b] (default all L).
    new is [B, H, L, D]. Returns cache."""
    op = "kv_append"
    _check_cache(cache, op)
    _check_cache(new, op, "new")
    B, H, T, D = cache.shape
    if new.shape[0] != B or new.shape[1] != H or new.shape[3] != D:
        raise ValueError(f"{op}: new must be [{B}, {H}, L, {D}] to match cache, got {tuple(new.shape)}")
    L = new.shape[2]
    starts = _rows_arg(starts, B, op, "starts", cache.device)
    counts = _rows_arg(L if counts is None else counts, B, op, "counts", cache.device)
    if bool((counts < 0).any()) or bool((counts > L).any()):
        raise ValueError(f"{op}: counts must lie in [0, {L}]")
    if bool((starts < 0).any()) or bool((starts + counts > T).any()):
        raise ValueError(f"{op}: starts + counts exceeds the cache capacity {T} "
                         f"(max {int((starts + counts).max())})")
    i = torch.arange(L, device=cache.device)
    valid = i[None, :] < counts[:, None]                       # [B, L]
    b_idx = torch.arange(B, device=cache.device)[:, None].expand(B, L)[valid]
    slot = (starts[:, None] + i[None, :])[valid]
    cache.transpose(1, 2)[b_idx, slot] = new.transpose(1, 2)[valid].to(cache.dtype)
    return cache


def kv_insert_reference(cache: torch.Tensor, lengths, at, entries: torch.Tensor) -> torch.Tensor:
    """In place: for each row, move slots [at[b], lengths[b]) right by N and write entries[b]
    ([H, N, D]) into slots [at[b], at[b] + N). The caller adds N to its lengths. Returns cache."""
    op = "kv_insert"
    _check_cache(cache, op)
    _check_cache(entries, op, "entries")
    B, H, T, D = cache.shape
    if entries.shape[0] != B or entries.shape[1] != H or entries.shape[3] != D:
        raise ValueError(f"{op}: entries must be [{B}, {H}, N, {D}] to match cache, got {tuple(entries.shape)}")
    N = entries.shape[2]
    lengths = _rows_arg(lengths, B, op, "lengths", cache.device)
    at = _rows_arg(at, B, op, "at", cache.device)
    if bool((at < 0).any()) or bool((at > lengths).any()):
        raise ValueError(f"{op}: at must lie in [0, lengths[b]] for every row")
    if bool((lengths + N > T).any()):
        raise ValueError(f"{op}: lengths + {N} exceeds the cache capacity {T}")
    for b in range(B):
        a, n = int(at[b]), int(lengths[b])
        if n > a:
            cache[b, :, a + N:n + N] = cache[b, :, a:n].clone()
        cache[b, :, a:a + N] = entries[b].to(cache.dtype)
    return cache


def kv_gather_rows_reference(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A new [len(rows), H, T, D] tensor: cache[rows]."""
    op = "kv_gather_rows"
    _check_cache(cache, op)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
        raise ValueError(f"{op}: rows must be a 1-d index tensor")
    rows = rows.to(device=cache.device, dtype=torch.long)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= cache.shape[0]):
        raise ValueError(f"{op}: rows must lie in [0, {cache.shape[0]})")
    return cache.index_select(0, rows)


# Compiled kernels take over these names when csrc/cache lands; until then the references serve.
kv_append = kv_append_reference
kv_insert = kv_insert_reference
kv_gather_rows = kv_gather_rows_reference
