"""Benchmark of the key-value cache ops: the compiled op through its wrapper (impl `mmfm`), the
bare torch.ops.mmfm call (`mmfm_op`: the wrapper's validation cost is the difference), the plain
torch path a model would write (`torch`; `torch_loop` where a per-row slice loop is the other
natural way) and the pure-torch reference (`reference`), side by side in one process on the same
tensors, for one layer's keys of a cache [B, H, T, D]:

    decode_append   L = 1 new slot per row at ragged lengths       torch: cache[b, :, starts] = new (index_put)
    prefill_append  ragged prompts (counts 64..L) from slot 0      torch: index_put of the valid (row, slot) pairs
                                                                   torch_loop: one slice copy per row
    insert          N latents after a prefix of P slots, ragged    torch: torch.cat of prefix, latents, rest,
                    lengths                                        copied back into the cache
    gather_beams    R = B rows with repeats (beam reordering)      torch: cache.index_select(0, rows)

Times are per call: the median over --repeats of a loop of calls, divided, with the impls of a
case timed round-robin so that load from other processes falls on all of them alike; the ratio
column is torch's time over this impl's (a speed-up above 1).

    mmfm bench cache [--json PATH] [--device cpu|cuda] [--quick] [--dtype bfloat16 float32]
"""
from __future__ import annotations

import statistics
import sys

import torch

from mmfm.bench.common import base_parser, by_case, machine, parse_args, record, report, time_ms
from mmfm.ops import cache as C

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _interleaved_ms(impls: dict, inner: int, device: str, repeats: int) -> dict[str, float]:
    """Median ms per call of each impl, timed round-robin (impl a, b, c, a, b, c, ...), so that
    load from other processes falls on every impl alike and the ratios stay meaningful on a
    busy machine. Each timing is a loop of `inner` calls."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for name, fn in impls.items():   # warm-up (allocator, first-touch, thread pools)
        time_ms(fn, device, repeats=1, warmup=1)
    for _ in range(repeats):
        for name, fn in impls.items():
            times[name].append(time_ms(lambda: [fn() for _ in range(inner)], device, repeats=1, warmup=0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_decode(B, H, T, D, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    new = torch.randn(B, H, 1, D, generator=g).to(device=device, dtype=dtype)
    starts = torch.randint(T // 20, T - 1, (B,), generator=g).to(device)
    rows = torch.arange(B, device=device)
    impls = {
        "mmfm": lambda: C.kv_append(cache, new, starts),
        "mmfm_op": lambda: torch.ops.mmfm.kv_append(cache, new, starts, None),
        "torch": lambda: cache.__setitem__((rows, slice(None), starts), new[:, :, 0]),
        "reference": lambda: C.kv_append_reference(cache, new, starts),
    }
    return _run("decode_append", dict(B=B, H=H, T=T, D=D, L=1), impls, dtype, device, repeats, inner)


def bench_prefill(B, H, T, D, L, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    # a model's keys: computed as [B, L, H, D] and transposed, so not contiguous along L
    new = torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    counts = torch.randint(min(64, L), L + 1, (B,), generator=g).to(device)
    starts = torch.zeros(B, dtype=torch.long, device=device)
    counts_host = counts.tolist()

    def torch_index_put():
        i = torch.arange(L, device=device)
        valid = i[None, :] < counts[:, None]
        b_idx = torch.arange(B, device=device)[:, None].expand(B, L)[valid]
        slot = (starts[:, None] + i[None, :])[valid]
        cache.transpose(1, 2)[b_idx, slot] = new.transpose(1, 2)[valid]

    def torch_loop():
        for b, n in enumerate(counts_host):
            cache[b, :, :n] = new[b, :, :n]

    impls = {
        "mmfm": lambda: C.kv_append(cache, new, starts, counts),
        "mmfm_op": lambda: torch.ops.mmfm.kv_append(cache, new, starts, counts),
        "torch": torch_index_put,
        "torch_loop": torch_loop,
        "reference": lambda: C.kv_append_reference(cache, new, starts, counts),
    }
    return _run("prefill_append", dict(B=B, H=H, T=T, D=D, L=L), impls, dtype, device, repeats, inner)


def bench_insert(B, H, T, D, N, P, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    entries = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    lengths = torch.randint(T // 4, T - N + 1, (B,), generator=g).to(device)
    at = torch.full((B,), P, dtype=torch.long, device=device)

    def torch_cat():   # one prefix length for all rows: shift the whole capacity (lengths unknown to it)
        cache.copy_(torch.cat([cache[:, :, :P], entries, cache[:, :, P:T - N]], 2))

    impls = {
        "mmfm": lambda: C.kv_insert(cache, lengths, at, entries),
        "mmfm_op": lambda: torch.ops.mmfm.kv_insert(cache, lengths, at, entries),
        "torch": torch_cat,
        "reference": lambda: C.kv_insert_reference(cache, lengths, at, entries),
    }
    return _run("insert", dict(B=B, H=H, T=T, D=D, N=N, P=P), impls, dtype, device, repeats, inner)


def bench_gather(B, H, T, D, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    rows = torch.sort(torch.randint(0, B, (B,), generator=g)).values.to(device)
    impls = {
        "mmfm": lambda: C.kv_gather_rows(cache, rows),
        "mmfm_op": lambda: torch.ops.mmfm.kv_gather_rows(cache, rows),
        "torch": lambda: cache.index_select(0, rows),
        "reference": lambda: C.kv_gather_rows_reference(cache, rows),
    }
    return _run("gather_beams", dict(B=B, H=H, T=T, D=D, R=B), impls, dtype, device, repeats, inner)


def _run(op, shape, impls, dtype, device, repeats, inner) -> list[dict]:
    case = {"op": op, **shape, "dtype": str(dtype).replace("torch.", "")}
    if device != "cpu":
        case["device"] = device
    with torch.no_grad():
        ms = _interleaved_ms(impls, inner, device, repeats)
    return [record("cache", case, name, ms=t) for name, t in ms.items()]


def summary(records: list[dict]) -> list[str]:
    """One line per case: speed-up of mmfm (wrapper) and mmfm_op over the plain torch path."""
    lines = []
    for key, t in by_case(records).items():
        if "mmfm" in t and "torch" in t:
            lines.append(f"{key}: mmfm {t['torch'] / t['mmfm']:.2f}x, mmfm_op {t['torch'] / t['mmfm_op']:.2f}x "
                         f"the torch path ({t['mmfm'] * 1e3:.1f} vs {t['torch'] * 1e3:.1f} us per call)")
    return lines


def main(argv=None) -> int:
    p = base_parser("cache", __doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="*", choices=sorted(DTYPES), help="cache dtypes (default bfloat16 float32)")
    p.add_argument("--B", type=int, default=8, help="rows (default 8)")
    p.add_argument("--H", type=int, default=4, help="kv heads (default 4)")
    p.add_argument("--T", type=int, default=2048, help="capacity in slots (default 2048)")
    p.add_argument("--D", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--L", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--N", type=int, default=16, help="latents inserted (default 16)")
    p.add_argument("--P", type=int, default=64, help="prefix length before the latents (default 64)")
    args = parse_args(p, argv)
    if args is None:
        return 2
    device = args.device
    B, H, D = args.B, args.H, args.D
    T, L = (256, 64) if args.quick else (args.T, args.L)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if args.quick else ["bfloat16", "float32"]))]
    repeats = 1 if args.quick else args.repeats
    k = 1 if args.quick else 10   # calls per timing, scaled per op so each timing is a few ms
    print(f"# cache benchmark on {machine()}; one layer's cache [B={B}, H={H}, T={T}, D={D}]", file=sys.stderr)
    records: list[dict] = []
    for dtype in dtypes:
        records += bench_decode(B, H, T, D, dtype, device, repeats, 20 * k)
        records += bench_prefill(B, H, T, D, L, dtype, device, repeats, k)
        records += bench_insert(B, H, T, D, args.N, min(args.P, T // 4), dtype, device, repeats, k)
        records += bench_gather(B, H, T, D, dtype, device, repeats, k)
    return report(records, args.json, summary(records), figures=("ms",), ratio_to="torch")


if __name__ == "__main__":
    sys.exit(main())
