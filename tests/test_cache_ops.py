"""Key-value cache ops (csrc/cache, mmfm/ops/cache.py): the compiled CPU ops against the pure-torch
references and against plain slicing, bit for bit, on random ragged rows in every cache dtype, with
strided sources and the edges (counts 0, appends that fill the capacity exactly, inserts at the
end of a row, N = 0, empty gathers); every bad argument raises an error naming it and writes
nothing; MMFM_DISABLE_EXTENSION=1 runs the references with one warning."""
from __future__ import annotations

import os
import subprocess
import sys
import json
import textwrap

import pytest
import torch

from mmfm.ops import cache as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.mmfm


@pytest.fixture(autouse=True)
def _compiled(needs_extension):
    """Every test here checks the compiled op (the fallback has its own subprocess test)."""


def rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ints(lo, hi, n, seed):
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed))


def slice_append(cache, new, starts, counts):
    out = cache.clone()
    for b in range(cache.shape[0]):
        s, n = int(starts[b]), int(counts[b])
        out[b, :, s:s + n] = new[b, :, :n].to(cache.dtype)
    return out


def slice_insert(cache, lengths, at, entries):
    out = cache.clone()
    N = entries.shape[2]
    for b in range(cache.shape[0]):
        a, n = int(at[b]), int(lengths[b])
        out[b, :, :n + N] = torch.cat([cache[b, :, :a], entries[b].to(cache.dtype), cache[b, :, a:n]], 1)
    return out


def strided(x):
    """x [B, H, L, D] with the memory layout of [B, L, H, D] (as a model's transposed keys)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


# ------------------------------------------------------------------------------ kv_append
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 5])
def test_append_matches_reference_and_slicing(dtype, D):
    B, H, T, L = 6, 3, 24, 9
    for seed in range(4):
        cache = rnd(B, H, T, D, dtype=dtype, seed=seed)
        new = rnd(B, H, L, D, dtype=dtype, seed=100 + seed)
        counts = ints(0, L, B, seed)
        counts[0] = 0                                   # a row that appends nothing
        starts = torch.stack([ints(0, T - int(n), 1, 7 * seed + b)[0] for b, n in enumerate(counts)])
        starts[1], counts[1] = T - L, L                 # a row that fills the capacity exactly
        want = slice_append(cache, new, starts, counts)
        for src in (new, strided(new)):
            got = cache.clone()
            ops.kv_append(got, src, starts, counts)
            assert torch.equal(got, want)
            assert torch.equal(C.kv_append(cache.clone(), src, starts, counts), want)
            assert torch.equal(C.kv_append_reference(cache.clone(), src, starts, counts), want)


def test_append_defaults_ints_and_dtype_cast():
    cache = rnd(3, 2, 10, 8, dtype=torch.bfloat16)
    new = rnd(3, 2, 4, 8)                               # fp32 source into a bf16 cache: cast as the reference
    want = slice_append(cache, new, torch.tensor([6, 6, 6]), torch.tensor([4, 4, 4]))
    assert torch.equal(C.kv_append(cache.clone(), new, 6), want)
    assert torch.equal(C.kv_append_reference(cache.clone(), new, 6), want)
    starts = torch.tensor([0, 3, 6], dtype=torch.int32)
    got = C.kv_append(cache.clone(), new, starts, torch.tensor([4, 0, 2], dtype=torch.int32))
    assert torch.equal(got, slice_append(cache, new, starts, torch.tensor([4, 0, 2])))
    empty = rnd(3, 2, 0, 8, dtype=torch.bfloat16)       # L = 0
    assert torch.equal(C.kv_append(cache.clone(), empty, 10), cache)


def test_append_large_enough_for_threads():
    """Past the parallel threshold the copy is split over (row, head) pairs."""
    B, H, T, D, L = 4, 4, 512, 64, 400                 # 1117 slots x 4 heads x 256 bytes > 1 MiB
    cache = rnd(B, H, T, D)
    new = strided(rnd(B, H, L, D, seed=1))
    starts, counts = torch.tensor([0, 50, 100, 3]), torch.tensor([400, 17, 400, 300])
    assert torch.equal(C.kv_append(cache.clone(), new, starts, counts), slice_append(cache, new, starts, counts))


# ------------------------------------------------------------------------------ kv_insert
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [0, 1, 4, 40])
def test_insert_matches_reference_and_slicing(dtype, N):
    B, H, T, D = 5, 2, 64, 6
    for seed in range(3):
        cache = rnd(B, H, T, D, dtype=dtype, seed=seed)
        entries = rnd(B, H, N, D, dtype=dtype, seed=50 + seed)
        lengths = ints(0, T - N, B, seed)
        at = torch.stack([ints(0, int(n), 1, 3 * seed + b)[0] for b, n in enumerate(lengths)])
        lengths[0] = T - N                              # fills the capacity exactly
        at[1] = lengths[1]                              # insert at the end: nothing moves
        at[2] = 0                                       # everything moves
        want = slice_insert(cache, lengths, at, entries)
        for src in (entries, strided(entries)):
            got = cache.clone()
            ops.kv_insert(got, lengths, at, src)
            assert torch.equal(got, want)
            assert torch.equal(C.kv_insert(cache.clone(), lengths, at, src), want)
            assert torch.equal(C.kv_insert_reference(cache.clone(), lengths, at, src), want)


def test_insert_long_overlapping_shift():
    """The moved range overlaps its destination many times over (N = 1 after 900 slots)."""
    B, H, T, D = 2, 4, 1024, 64
    cache = rnd(B, H, T, D)
    ent = rnd(B, H, 1, D, seed=3)
    lengths, at = torch.tensor([1000, 1023]), torch.tensor([100, 0])
    assert torch.equal(C.kv_insert(cache.clone(), lengths, at, ent), slice_insert(cache, lengths, at, ent))


# ------------------------------------------------------------------------- kv_gather_rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_matches_indexing(dtype):
    cache = rnd(4, 3, 17, 5, dtype=dtype)
    for rows in ([2, 0, 0, 1, 3, 3, 3], [1], [], list(range(4))):
        r = torch.tensor(rows, dtype=torch.long)
        got = C.kv_gather_rows(cache, r)
        assert got.shape == (len(rows), 3, 17, 5) and got.is_contiguous()
        assert torch.equal(got, cache[r])
        assert torch.equal(ops.kv_gather_rows(cache, r), cache[r])
        assert torch.equal(C.kv_gather_rows_reference(cache, r), cache[r])
    got = C.kv_gather_rows(cache, torch.tensor([3, 1], dtype=torch.int32))
    assert torch.equal(got, cache[[3, 1]])
    assert got.data_ptr() != cache.data_ptr()           # a copy, not a view
    big = rnd(3, 4, 512, 64)                            # past the parallel threshold
    assert torch.equal(C.kv_gather_rows(big, torch.tensor([2, 2, 0, 1])), big[[2, 2, 0, 1]])


# --------------------------------------------------------------------------------- errors
APPEND = [C.kv_append, C.kv_append_reference]
INSERT = [C.kv_insert, C.kv_insert_reference]
GATHER = [C.kv_gather_rows, C.kv_gather_rows_reference]


def _ids(fns):
    return [f.__name__ for f in fns]


@pytest.mark.parametrize("fn", APPEND, ids=_ids(APPEND))
def test_append_value_errors_name_the_argument_and_write_nothing(fn):
    cache = rnd(3, 2, 10, 4)
    new = rnd(3, 2, 4, 4, seed=1)
    cases = [
        (torch.tensor([0, -1, 0]), None, r"'starts' is -1 for row 1; it must be >= 0"),
        (torch.tensor([0, 0, 0]), torch.tensor([1, 5, 0]), r"'counts' is 5 for row 1; it must lie in \[0, L=4\]"),
        (torch.tensor([0, 0, 7]), torch.tensor([1, 1, 4]), r"row 2: starts \+ counts = 7 \+ 4 exceeds the cache "
                                                           r"capacity T=10"),
        (torch.tensor([11, 0, 0]), torch.tensor([0, 1, 1]), r"row 0: .*capacity"),
    ]
    for starts, counts, msg in cases:
        c = cache.clone()
        with pytest.raises(ValueError, match=msg):
            fn(c, new, starts, counts)
        assert torch.equal(c, cache)


@pytest.mark.parametrize("fn", INSERT, ids=_ids(INSERT))
def test_insert_value_errors_name_the_argument_and_write_nothing(fn):
    cache = rnd(2, 2, 10, 4)
    ent = rnd(2, 2, 3, 4, seed=1)
    cases = [
        (torch.tensor([2, 11]), torch.tensor([0, 0]), r"'lengths' is 11 for row 1; it must lie in \[0, T=10\]"),
        (torch.tensor([-1, 2]), torch.tensor([0, 0]), r"'lengths' is -1 for row 0"),
        (torch.tensor([4, 2]), torch.tensor([5, 0]), r"'at' is 5 for row 0; it must lie in \[0, lengths\[0\]=4\]"),
        (torch.tensor([4, 2]), torch.tensor([0, -2]), r"'at' is -2 for row 1"),
        (torch.tensor([4, 8]), torch.tensor([0, 1]), r"row 1: lengths \+ N = 8 \+ 3 exceeds the cache capacity T=10"),
    ]
    for lengths, at, msg in cases:
        c = cache.clone()
        with pytest.raises(ValueError, match=msg):
            fn(c, lengths, at, ent)
        assert torch.equal(c, cache)


@pytest.mark.parametrize("fn", GATHER, ids=_ids(GATHER))
def test_gather_value_errors(fn):
    cache = rnd(3, 2, 5, 4)
    with pytest.raises(ValueError, match=r"'rows' holds 3 at position 1; rows must lie in \[0, B=3\)"):
        fn(cache, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"'rows' holds -1 at position 0"):
        fn(cache, torch.tensor([-1]))


@pytest.mark.parametrize("fns", [(C.kv_append, C.kv_insert, C.kv_gather_rows),
                                 (C.kv_append_reference, C.kv_insert_reference, C.kv_gather_rows_reference)],
                         ids=["compiled", "reference"])
def test_type_layout_and_device_errors(fns):
    append, insert, gather = fns
    cache = rnd(2, 2, 8, 4)
    new = rnd(2, 2, 3, 4)
    lens = torch.tensor([2, 2])
    with pytest.raises(TypeError, match="'cache' must be float32, float16 or bfloat16, got torch.int64"):
        append(cache.long(), new, 0)
    with pytest.raises(TypeError, match="'cache' must be float32, float16 or bfloat16"):
        gather(cache.double(), lens)
    with pytest.raises(ValueError, match=r"'cache' must have shape \[B, H, T, D\]"):
        append(cache[0], new, 0)
    with pytest.raises(ValueError, match="'cache' must be contiguous"):
        append(cache.transpose(2, 3).contiguous().transpose(2, 3), new, 0)
    with pytest.raises(ValueError, match="'cache' must be contiguous"):
        insert(cache[:, :, ::2], lens, 0, new)
    with pytest.raises(ValueError, match="'cache' must be contiguous"):
        gather(cache[:, :1], lens)
    with pytest.raises(TypeError, match="'new' must be a float tensor, got torch.int64"):
        append(cache, new.long(), 0)
    with pytest.raises(ValueError, match=r"'new' must have shape \[B=2, H=2, L, D=4\]"):
        append(cache, rnd(2, 2, 3, 5), 0)
    with pytest.raises(ValueError, match=r"'entries' must have shape \[B=2, H=2, L, D=4\]"):
        insert(cache, lens, 0, rnd(1, 2, 3, 4))
    with pytest.raises(TypeError, match="'starts' must hold integers, got torch.float32"):
        append(cache, new, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="'counts' must hold integers, got torch.bool"):
        append(cache, new, 0, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"'starts' must be an int or a tensor of shape \[B=2\]"):
        append(cache, new, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="'at' must be an int or an integer tensor"):
        insert(cache, lens, 1.5, new)
    with pytest.raises(TypeError, match="'rows' must hold integers, got torch.float32"):
        gather(cache, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"'rows' must have shape \[R\]"):
        gather(cache, torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"arguments 'cache' \(cpu\) and 'new' \(meta\) must be on the same device"):
        append(cache, new.to("meta"), 0)
    with pytest.raises(ValueError, match=r"arguments 'cache' \(cpu\) and 'entries' \(meta\)"):
        insert(cache, lens, 0, new.to("meta"))


def test_direct_op_checks_name_the_argument():
    """torch.ops.mmfm.* called without the wrapper raise the same kinds of errors."""
    cache = rnd(2, 2, 8, 4)
    new = rnd(2, 2, 3, 4)
    s = torch.tensor([0, 0])
    with pytest.raises(TypeError, match=r"mmfm.kv_append: argument 'new' \(BFloat16\) must have the dtype of 'cache'"):
        ops.kv_append(cache, new.bfloat16(), s, None)
    with pytest.raises(ValueError, match="argument 'new' must have unit stride along D"):
        ops.kv_append(cache, torch.randn(2, 2, 4, 3).transpose(2, 3), s, None)   # D has stride 3
    with pytest.raises(TypeError, match="argument 'starts' must be Long, got Int"):
        ops.kv_append(cache, new, s.int(), None)
    with pytest.raises(ValueError, match=r"argument 'counts' must have shape \[2\]"):
        ops.kv_append(cache, new, s, torch.tensor([1]))
    with pytest.raises(ValueError, match="argument 'cache' must be contiguous"):
        ops.kv_insert(cache[:, :, ::2], s, s, new)
    with pytest.raises(TypeError, match="argument 'entries' must be float32, float16 or bfloat16"):
        ops.kv_insert(cache, s, s, new.double())
    with pytest.raises(TypeError, match="argument 'rows' must be Long"):
        ops.kv_gather_rows(cache, s.int())
    with pytest.raises(ValueError, match=r"row 1: starts \+ counts = 6 \+ 3 exceeds the cache capacity T=8"):
        ops.kv_append(cache, new, torch.tensor([0, 6]), None)


# ------------------------------------------------------------------------------- fallback
def test_fallback_without_extension_runs_references_with_one_warning(run_without_extension):
    script = textwrap.dedent("""
        import warnings
        import torch
        from mmfm import _ext
        from mmfm.ops import cache as C
        assert not _ext.extension_loaded(), _ext.load_error()
        cache = torch.randn(3, 2, 10, 4)
        new = torch.randn(3, 2, 4, 4)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = C.kv_append(cache.clone(), new, torch.tensor([0, 3, 6]), torch.tensor([4, 2, 4]))
            ins = C.kv_insert(cache.clone(), torch.tensor([5, 2, 6]), torch.tensor([2, 2, 0]), new[:, :, :3])
            rows = C.kv_gather_rows(cache, torch.tensor([2, 0, 0]))
            try:
                C.kv_append(cache.clone(), new, torch.tensor([0, 0, 7]))
                raise SystemExit("no error")
            except ValueError as e:
                assert "row 2: starts + counts = 7 + 4 exceeds the cache capacity T=10" in str(e), e
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and "pure-torch reference" in msgs[0], msgs
        want = cache.clone()
        for b, (s, n) in enumerate([(0, 4), (3, 2), (6, 4)]):
            want[b, :, s:s + n] = new[b, :, :n]
        assert torch.equal(got, want)
        for b, (a, n) in enumerate([(2, 5), (2, 2), (0, 6)]):
            assert torch.equal(ins[b, :, :n + 3], torch.cat([cache[b, :, :a], new[b, :, :3], cache[b, :, a:n]], 1))
        assert torch.equal(rows, cache[[2, 0, 0]])
        print("fallback ok")
    """)
    proc = run_without_extension(script)
    assert proc.returncode == 0, proc.stdout
    assert "fallback ok" in proc.stdout


# ------------------------------------------------------------------------------ benchmark
def test_bench_cache_quick_writes_records(tmp_path):
    path = tmp_path / "cache.json"
    proc = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "cache", "--quick", "--json", str(path)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]   # non-zero also when an impl disagreed with the reference
    records = json.loads(path.read_text())
    ops_seen = {r["case"]["op"] for r in records}
    assert ops_seen == {"decode_append", "prefill_append", "insert", "gather_beams"}
    for op in ops_seen:
        impls = {r["impl"] for r in records if r["case"]["op"] == op}
        assert {"mmfm", "mmfm_op", "reference"} <= impls and impls & {"torch", "torch_loop"}, (op, impls)
    assert all(r["bench"] == "cache" and r["ms"] > 0 for r in records)
    assert "the fastest torch baseline" in proc.stdout
