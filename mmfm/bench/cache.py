"""Benchmark of the key-value cache ops: the compiled op through its wrapper (impl `mmfm`), the
bare torch.ops.mmfm call (`mmfm_op`: the wrapper's validation cost is the difference), the torch
code a user writes for the same job (`torch`, `torch_loop`) and the pure-torch reference
(`reference`), side by side in one process on the same tensors, for one layer's keys of a cache
[B, H, T, D]. Index tensors and host-side lists are built before the timing, as a decode loop
would build them once; only the copies are timed.

    case            what                                  torch baselines (what is timed)
    decode_append   1 new slot per row, ragged lengths    torch: cache[rows, :, starts] = new[:, :, 0] (index_put,
                                                          as DenseStep writes ragged rows); torch_loop: one
                                                          cache[b, :, s].copy_ per row
    prefill_append  ragged prompts (counts 64..L) from    torch: index_put of the valid (row, slot) pairs;
                    slot 0, keys transposed [B,L,H,D]     torch_loop: cache[b, :, s:s+n] = new[b, :, :n] per row
    insert          N latents after a prefix of P slots,  torch_loop: per row, the live slots [P, length) moved
                    ragged lengths                        right by N (a slice copy of a clone) and the N latents
                                                          copied in; only live slots move, as in the op
    gather_beams    R = B rows with repeats               torch: cache.index_select(0, rows)

Which of these mmfm's decode loop (mmfm/generate/decode.py, step.py) calls, and so which get a
headline figure:
    prefill_append  every `mmfm generate` prefill: model(ids, cache, counts=lens) -> KVCache.write
    decode_append   each step of the general forward (modality-sparse models, cache-augmented
                    decoding); dense models step through DenseStep, which writes with the index_put
                    of impl `torch` (ragged rows) or one slice copy (equal lengths)
    insert          not called (KVCache.insert has no caller: cache augmentation appends its latents
                    through the decoder's forward); table only
    gather_beams    not called (KVCache.reorder_rows has no caller in mmfm's decoders); table only

Before timing, every impl runs once from the same starting cache and the results must be equal
(exact: these are copies), and the `mmfm` impl must have dispatched a torch.ops.mmfm op (see
mmfm/bench/common.py). Times: per call, the median over --repeats rounds, each round timing every
impl once in turn as a loop of calls, so that load from other processes falls on all alike;
`cpu_ms` is the process CPU time per call. The ratio column is the fastest torch baseline's time
over this impl's (a speed-up above 1).

    mmfm bench cache [--json PATH] [--device cpu|cuda] [--quick] [--dtype bfloat16 float32]
"""
from __future__ import annotations

import sys

import torch

from mmfm.bench.common import (base_parser, by_case, check_agree, interleaved, machine, parse_args, record, report,
                               require_compiled)
from mmfm.ops import cache as C

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
TORCH_IMPLS = ("torch", "torch_loop")
CALLED_BY_DECODE = {
    "prefill_append": "every prefill of mmfm generate",
    "decode_append": "each step of the general forward (sparse models, cache augmentation); "
                     "DenseStep writes like impl torch",
}


def bench_decode(B, H, T, D, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    new = torch.randn(B, H, 1, D, generator=g).to(device=device, dtype=dtype)
    starts = torch.randint(T // 20, T - 1, (B,), generator=g).to(device)
    rows = torch.arange(B, device=device)
    starts_host = starts.tolist()
    new_rows = new[:, :, 0]

    def torch_loop():
        for b, s in enumerate(starts_host):
            cache[b, :, s].copy_(new_rows[b])

    impls = {
        "reference": lambda: C.kv_append_reference(cache, new, starts),
        "mmfm": lambda: C.kv_append(cache, new, starts),
        "mmfm_op": lambda: torch.ops.mmfm.kv_append(cache, new, starts, None),
        "torch": lambda: cache.__setitem__((rows, slice(None), starts), new_rows),
        "torch_loop": torch_loop,
    }
    return _run("decode_append", dict(B=B, H=H, T=T, D=D, L=1), impls, cache, dtype, device, repeats, inner)


def bench_prefill(B, H, T, D, L, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    # a model's keys: computed as [B, L, H, D] and transposed, so not contiguous along L
    new = torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    counts = torch.randint(min(64, L), L + 1, (B,), generator=g).to(device)
    starts = torch.zeros(B, dtype=torch.long, device=device)
    counts_host, starts_host = counts.tolist(), starts.tolist()
    i = torch.arange(L, device=device)
    src_b, src_i = (i[None, :] < counts[:, None]).nonzero(as_tuple=True)   # the valid (row, token) pairs
    dst_slot = starts[src_b] + src_i
    cache_t, new_t = cache.transpose(1, 2), new.transpose(1, 2)             # [B, T, H, D], [B, L, H, D] views

    def torch_index_put():
        cache_t[src_b, dst_slot] = new_t[src_b, src_i]

    def torch_loop():
        for b, (s, n) in enumerate(zip(starts_host, counts_host)):
            cache[b, :, s:s + n] = new[b, :, :n]

    impls = {
        "reference": lambda: C.kv_append_reference(cache, new, starts, counts),
        "mmfm": lambda: C.kv_append(cache, new, starts, counts),
        "mmfm_op": lambda: torch.ops.mmfm.kv_append(cache, new, starts, counts),
        "torch": torch_index_put,
        "torch_loop": torch_loop,
    }
    return _run("prefill_append", dict(B=B, H=H, T=T, D=D, L=L), impls, cache, dtype, device, repeats, inner)


def bench_insert(B, H, T, D, N, P, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    entries = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    lengths = torch.randint(T // 4, T - N + 1, (B,), generator=g).to(device)
    at = torch.full((B,), P, dtype=torch.long, device=device)
    lengths_host = lengths.tolist()

    def torch_loop():   # source and destination overlap, hence the clone
        for b, n in enumerate(lengths_host):
            cache[b, :, P + N:n + N] = cache[b, :, P:n].clone()
            cache[b, :, P:P + N] = entries[b]

    impls = {
        "reference": lambda: C.kv_insert_reference(cache, lengths, at, entries),
        "mmfm": lambda: C.kv_insert(cache, lengths, at, entries),
        "mmfm_op": lambda: torch.ops.mmfm.kv_insert(cache, lengths, at, entries),
        "torch_loop": torch_loop,
    }
    return _run("insert", dict(B=B, H=H, T=T, D=D, N=N, P=P), impls, cache, dtype, device, repeats, inner)


def bench_gather(B, H, T, D, dtype, device, repeats, inner) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    rows = torch.sort(torch.randint(0, B, (B,), generator=g)).values.to(device)
    impls = {
        "reference": lambda: C.kv_gather_rows_reference(cache, rows),
        "mmfm": lambda: C.kv_gather_rows(cache, rows),
        "mmfm_op": lambda: torch.ops.mmfm.kv_gather_rows(cache, rows),
        "torch": lambda: cache.index_select(0, rows),
    }
    return _run("gather_beams", dict(B=B, H=H, T=T, D=D, R=B), impls, cache, dtype, device, repeats, inner)


def check_impls(what: str, impls: dict, cache: torch.Tensor, returns: bool = False) -> None:
    """Every impl once from the same starting cache: its result (returns: the tensor it returns;
    otherwise the cache it wrote) must equal the reference's exactly; the mmfm impl must run the
    compiled op."""
    start = cache.clone()
    outs = {}
    for name, fn in impls.items():
        cache.copy_(start)
        got = fn()
        outs[name] = (got if returns else cache).clone()
    cache.copy_(start)
    check_agree(outs, what)
    require_compiled(impls["mmfm"], what)


def _run(op, shape, impls, cache, dtype, device, repeats, inner) -> list[dict]:
    case = {"op": op, **shape, "dtype": str(dtype).replace("torch.", "")}
    if device != "cpu":
        case["device"] = device
    with torch.no_grad():
        check_impls(f"cache {op} {case['dtype']}", impls, cache, returns=op == "gather_beams")
        times = interleaved(impls, device, repeats, inner)
    return [record("cache", case, name, **t) for name, t in times.items()]


def summary(records: list[dict]) -> list[str]:
    """One line per case: for the ops the decode loop calls, the speed-up of mmfm (wrapper) and
    mmfm_op over the fastest torch baseline; the others are named as table-only."""
    lines = []
    cpu = by_case(records, "cpu_ms")
    for key, t in by_case(records).items():
        c = cpu[key]
        op = key.split()[0].split("=", 1)[1]
        base = min((n for n in TORCH_IMPLS if n in t), key=lambda n: t[n], default=None)
        if base is None or "mmfm" not in t:
            continue
        if op not in CALLED_BY_DECODE:
            lines.append(f"{key}: not called by mmfm's decode loop; no headline (table only)")
            continue
        lines.append(f"{key}: mmfm {t[base] / t['mmfm']:.2f}x, mmfm_op {t[base] / t['mmfm_op']:.2f}x the fastest "
                     f"torch baseline ({base}: {t[base] * 1e3:.1f} us vs mmfm {t['mmfm'] * 1e3:.1f} us per call; "
                     f"CPU time: mmfm {c[base] / c['mmfm']:.2f}x, mmfm_op {c[base] / c['mmfm_op']:.2f}x); "
                     f"called by the decode loop: {CALLED_BY_DECODE[op]}")
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
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms"), ratio_to=TORCH_IMPLS)


if __name__ == "__main__":
    sys.exit(main())
