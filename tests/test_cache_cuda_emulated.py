"""The CUDA key-value cache kernels' logic, run on the CPU.

tests/cuda_emu builds csrc/cache/kv_cuda_kernel.cuh as plain C++ against a stand-in for the CUDA
runtime (each thread a fiber, barriers as yields; the production 256 threads per block, and 64),
so the validation block, the grid-stride copies (with a few blocks, so every thread loops) and
the insert's tiled backward shift with its barriers are checked bit for bit against plain
slicing on machines without a GPU.
Every access width the launcher can pick (16, 8, 4, 2 bytes) is exercised. It says nothing about
timing or real concurrency: tests/test_cache_cuda.py does that on a GPU. Needs g++.
"""
import ctypes

import pytest
import torch
from emu_build import CXX, build_emulator

from test_cache_ops import rnd, slice_append, slice_insert, strided

if CXX is None:
    pytest.skip("no C++ compiler (g++) to build the CUDA emulation", allow_module_level=True)

SOURCES = ["tests/cuda_emu/emu_cache.cpp", "tests/cuda_emu/cuda_runtime.h", "csrc/cache/kv_cuda_kernel.cuh",
           "csrc/cache/cache_kernels.h", "csrc/common/cuda_launch.cuh", "csrc/common/dtype.h"]
P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@pytest.fixture(scope="module", params=[256, 64], ids=["256-threads", "64-threads"])
def emu(request):
    """The production block (256 threads, kv_cuda_kernel.cuh) and a two-warp one, where an
    insert tile is 256 units so the small shapes below already span several tiles."""
    production = request.param == 256
    lib = build_emulator(SOURCES, "mmfm_cache_emu",
                         defines=None if production else {"MMFM_CACHE_CUDA_THREADS": request.param})
    assert lib.emu_cache_threads() == request.param
    lib.emu_kv_append.argtypes = [P, I64, I64, I64, I64, P, I64, I64, I64, I64, P, P, I32, ctypes.c_uint, P]
    lib.emu_kv_insert.argtypes = [P, I64, I64, I64, I64, P, I64, I64, I64, I64, P, P, I32, P]
    lib.emu_kv_gather_rows.argtypes = [P, I64, I64, I64, I64, P, I64, P, I32, ctypes.c_uint, P]
    return lib


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def width(*values):
    """The launcher's choice: the widest of 16, 8, 4, 2, 1 bytes dividing every value."""
    w = 16
    for v in values:
        while w > 1 and v % w:
            w //= 2
    return w


def geometry(cache, src):
    es = cache.element_size()
    row = cache.shape[3] * es
    strides = [s * es for s in src.stride()[:3]]
    return row, strides, width(row, cache.data_ptr(), src.data_ptr(), *strides)


def emu_append(lib, cache, new, starts, counts, grid=3, vec=None):
    B, H, T, _ = cache.shape
    row, (sb, sh, sl), w = geometry(cache, new)
    status = torch.full((B + 1,), -7, dtype=torch.int32)
    lib.emu_kv_append(ptr(cache), B, H, T, row, ptr(new), new.shape[2], sb, sh, sl, ptr(starts), ptr(counts),
                      vec or w, grid, ptr(status))
    return status


def emu_insert(lib, cache, lengths, at, entries, vec=None):
    B, H, T, _ = cache.shape
    row, (sb, sh, sl), w = geometry(cache, entries)
    status = torch.full((B + 1,), -7, dtype=torch.int32)
    lib.emu_kv_insert(ptr(cache), B, H, T, row, ptr(entries), entries.shape[2], sb, sh, sl, ptr(lengths), ptr(at),
                      vec or w, ptr(status))
    return status


@pytest.mark.parametrize("dtype,D,vec", [(torch.float32, 8, 16), (torch.bfloat16, 8, 16), (torch.float16, 4, 8),
                                         (torch.float32, 3, 4), (torch.bfloat16, 3, 2)])
def test_emulated_append(emu, dtype, D, vec):
    B, H, T, L = 4, 3, 40, 7
    cache = rnd(B, H, T, D, dtype=dtype)
    for src in (rnd(B, H, L, D, dtype=dtype, seed=1), strided(rnd(B, H, L, D, dtype=dtype, seed=2))):
        starts, counts = torch.tensor([0, 5, T - L, 39]), torch.tensor([7, 0, 7, 1])
        got = cache.clone()
        st = emu_append(emu, got, src, starts, counts)
        assert st.tolist() == [0] * (B + 1)
        assert geometry(cache, src)[2] == vec
        assert torch.equal(got, slice_append(cache, src, starts, counts))
        got = cache.clone()                               # counts absent: every row appends all L
        emu_append(emu, got, src, starts.clamp(max=T - L), None, grid=1)
        assert torch.equal(got, slice_append(cache, src, starts.clamp(max=T - L), torch.full((B,), L)))


@pytest.mark.parametrize("dtype,D", [(torch.float32, 8), (torch.bfloat16, 64), (torch.float16, 3)])
@pytest.mark.parametrize("N", [1, 5, 70])
def test_emulated_insert_tiled_shift(emu, dtype, D, N):
    """Moves of many tiles (a tile is 4 units per thread: 1024 at 256 threads, 256 at 64), shifts
    smaller and larger than a tile."""
    B, H, T = 3, 2, 400
    cache = rnd(B, H, T, D, dtype=dtype)
    entries = strided(rnd(B, H, N, D, dtype=dtype, seed=4))
    lengths = torch.tensor([T - N, 9, 300])
    at = torch.tensor([0, 9, 123])
    got = cache.clone()
    st = emu_insert(emu, got, lengths, at, entries)
    assert st.tolist() == [0] * (B + 1)
    assert torch.equal(got, slice_insert(cache, lengths, at, entries))


def test_emulated_insert_every_width(emu):
    cache = rnd(2, 2, 300, 8)
    ent = rnd(2, 2, 3, 8, seed=5)
    lengths, at = torch.tensor([290, 200]), torch.tensor([1, 50])
    want = slice_insert(cache, lengths, at, ent)
    for vec in (16, 8, 4, 2, 1):
        got = cache.clone()
        emu_insert(emu, got, lengths, at, ent, vec=vec)
        assert torch.equal(got, want), vec


def test_emulated_gather(emu):
    cache = rnd(4, 3, 50, 8, dtype=torch.bfloat16)
    rows = torch.tensor([3, 0, 0, 2, 1, 3])
    for vec, grid in ((16, 2), (4, 5), (2, 1)):
        out = torch.empty(6, 3, 50, 8, dtype=torch.bfloat16)
        st = torch.full((7,), -7, dtype=torch.int32)
        emu.emu_kv_gather_rows(ptr(cache), 4, 3, 50, 16, ptr(rows), 6, ptr(out), vec, grid, ptr(st))
        assert st.tolist() == [0] * 7
        assert torch.equal(out, cache[rows])


def test_emulated_bad_rows_write_nothing(emu):
    """The validation block flags the bad rows and sets status[B]; the copy kernels then skip all rows."""
    cache = rnd(3, 2, 10, 8)
    new = rnd(3, 2, 4, 8, seed=1)
    got = cache.clone()
    st = emu_append(emu, got, new, torch.tensor([0, -1, 7]), torch.tensor([4, 1, 4]))
    assert st.tolist() == [0, 1, 3, 1]
    assert torch.equal(got, cache)
    st = emu_append(emu, got, new, torch.tensor([0, 0, 0]), torch.tensor([4, 5, 0]))
    assert st.tolist() == [0, 2, 0, 1]
    st = emu_insert(emu, got, torch.tensor([11, 4, 8]), torch.tensor([0, 5, 0]), new[:, :, :3])
    assert st.tolist() == [4, 5, 3, 1]
    assert torch.equal(got, cache)
    out = torch.zeros(2, 2, 10, 8)
    st = torch.full((3,), -7, dtype=torch.int32)
    rows = torch.tensor([1, 3])
    emu.emu_kv_gather_rows(ptr(cache), 3, 2, 10, 32, ptr(rows), 2, ptr(out), 16, 2, ptr(st))
    assert st.tolist() == [0, 6, 1]
    assert not out.any()
