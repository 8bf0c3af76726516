"""CUDA kernels of the key-value cache ops (csrc/cache/kv_cuda.cu) against plain slicing, bit for
bit: ragged appends (contiguous and strided sources, every access width), inserts with long
overlapping shifts, gathers, all-or-nothing errors and device checks. Every test is skipped, with
the reason, when there is no CUDA device or mmfm._C was built without its CUDA kernels (the
kernels' logic is also checked on the CPU by tests/test_cache_cuda_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

import mmfm.ops
from mmfm.ops import cache as C
from test_cache_ops import DTYPES, rnd, slice_append, slice_insert, strided


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not mmfm.ops.with_cuda():
        return "mmfm._C built without CUDA kernels"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
DEV = "cuda"
ops = torch.ops.mmfm


def cu(*shape, dtype=torch.float32, seed=0):
    return rnd(*shape, dtype=dtype, seed=seed).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [128, 64, 4, 3])
def test_cuda_append_ragged(dtype, D):
    B, H, T, L = 8, 4, 300, 33
    g = torch.Generator().manual_seed(D)
    cache = cu(B, H, T, D, dtype=dtype)
    counts = torch.randint(0, L + 1, (B,), generator=g)
    counts[0] = 0
    starts = torch.stack([torch.randint(0, T - int(n) + 1, (1,), generator=g)[0] for n in counts])
    starts[1], counts[1] = T - L, L
    for src in (cu(B, H, L, D, dtype=dtype, seed=1), strided(cu(B, H, L, D, dtype=dtype, seed=2)),
                cu(B, H, L + 1, D, dtype=dtype, seed=3)[:, :, 1:]):   # an offset base pointer
        want = slice_append(cache.cpu(), src.cpu(), starts, counts)
        got = C.kv_append(cache.clone(), src, starts.to(DEV), counts.to(DEV))
        assert torch.equal(got.cpu(), want)
        got = C.kv_append(cache.clone(), src, starts, counts)            # CPU row arguments are moved
        assert torch.equal(got.cpu(), want)


def test_cuda_decode_step_and_kv_cache_rows():
    B, H, T, D = 8, 4, 2048, 64
    cache = cu(B, H, T, D, dtype=torch.bfloat16)
    new = cu(B, H, 1, D, dtype=torch.bfloat16, seed=1)
    starts = torch.tensor([0, 5, 100, 2047, 1000, 7, 8, 9], device=DEV)
    got = C.kv_append(cache.clone(), new, starts)
    assert torch.equal(got.cpu(), slice_append(cache.cpu(), new.cpu(), starts.cpu(), torch.ones(B, dtype=torch.long)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [0, 1, 16, 700])
def test_cuda_insert_overlapping_shift(dtype, N):
    B, H, T, D = 4, 4, 2048, 64
    cache = cu(B, H, T, D, dtype=dtype)
    entries = strided(cu(B, H, N, D, dtype=dtype, seed=4))
    lengths = torch.tensor([T - N, 1000, 3, 1300])
    at = torch.tensor([0, 64, 3, 1299])
    got = C.kv_insert(cache.clone(), lengths.to(DEV), at.to(DEV), entries)
    assert torch.equal(got.cpu(), slice_insert(cache.cpu(), lengths, at, entries.cpu()))


def test_cuda_insert_odd_rows():
    cache = cu(3, 2, 500, 3, dtype=torch.float16)        # 6-byte slots: 2-byte accesses
    ent = cu(3, 2, 5, 3, dtype=torch.float16, seed=1)
    lengths, at = torch.tensor([495, 10, 400]), torch.tensor([1, 10, 200])
    got = C.kv_insert(cache.clone(), lengths, at, ent)
    assert torch.equal(got.cpu(), slice_insert(cache.cpu(), lengths, at, ent.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gather_rows(dtype):
    cache = cu(6, 4, 513, 64, dtype=dtype)
    for rows in ([5, 0, 0, 3, 3, 3, 1, 2], [2], []):
        r = torch.tensor(rows, dtype=torch.long, device=DEV)
        assert torch.equal(C.kv_gather_rows(cache, r), cache[r])
    odd = cu(3, 2, 7, 3, dtype=dtype)
    assert torch.equal(C.kv_gather_rows(odd, torch.tensor([2, 0], device=DEV)), odd[[2, 0]])


def test_cuda_errors_write_nothing_and_devices_are_checked():
    cache = cu(3, 2, 10, 8)
    new = cu(3, 2, 4, 8, seed=1)
    c = cache.clone()
    with pytest.raises(ValueError, match=r"row 2: starts \+ counts = 7 \+ 4 exceeds the cache capacity T=10"):
        C.kv_append(c, new, torch.tensor([0, 1, 7], device=DEV))
    with pytest.raises(ValueError, match=r"'at' is 5 for row 0"):
        C.kv_insert(c, torch.tensor([4, 2, 2], device=DEV), torch.tensor([5, 0, 0], device=DEV), new[:, :, :2])
    with pytest.raises(ValueError, match=r"'rows' holds 3 at position 1"):
        C.kv_gather_rows(c, torch.tensor([0, 3], device=DEV))
    assert torch.equal(c, cache)
    with pytest.raises(ValueError, match=r"arguments 'cache' \(cuda:0\) and 'new' \(cpu\) must be on the same device"):
        C.kv_append(c, new.cpu(), 0)
    with pytest.raises(ValueError, match=r"arguments 'cache' \(cuda:0\) and 'starts' \(cpu\) must be on the same"):
        ops.kv_append(c, new, torch.tensor([0, 0, 0]), None)
    torch.cuda.synchronize()
