"""Shared pieces of the benchmarks in mmfm/bench: arguments, timing, memory, records, table, JSON.

Each benchmark module exposes `main(argv=None) -> int` and is run through `mmfm bench NAME` or
`python -m mmfm.bench.NAME`. Records follow docs/records.md: flat dicts with `bench`, `case`,
`impl`, a timing (`ms`, the median) and optionally `peak_extra_mb`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable

import torch

from mmfm.jsonio import write_records


def base_parser(name: str, description: str, threads_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes; `--threads` too when threads_help is given."""
    p = argparse.ArgumentParser(prog=f"mmfm bench {name}", description=description)
    p.add_argument("--json", metavar="PATH", help="also write the records as a JSON list to PATH")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported")
    p.add_argument("--quick", action="store_true", help="smaller cases, for smoke tests")
    if threads_help:
        p.add_argument("--threads", type=int, default=0, help=f"torch threads ({threads_help})")
    return p


def parse_args(p: argparse.ArgumentParser, argv, cpu_only: str | None = None) -> argparse.Namespace | None:
    """Parsed arguments with --threads applied, or None (the caller exits 2) after saying why
    --device cannot run: `cpu_only` is the benchmark's reason to measure the CPU only."""
    args = p.parse_args(argv)
    if cpu_only and args.device != "cpu":
        print(f"{p.prog}: only --device cpu is {cpu_only}", file=sys.stderr)
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{p.prog}: --device cuda needs a visible GPU", file=sys.stderr)
        return None
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory fn() allocates beyond what was in use before it, in MiB.

    CUDA: torch's peak allocator statistic. CPU: resident set size sampled every 0.5 ms
    while fn runs (Linux /proc), which catches a transient N x K buffer.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0.0, (torch.cuda.max_memory_allocated() - before) / 2**20)
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return max(0.0, (peak[0] - before) / 2**20)


def record(bench: str, case: dict, impl: str, **figures) -> dict:
    return {"bench": bench, "case": dict(case), "impl": impl, **figures}


def time_impls(bench: str, case: dict, impls: dict, device: str, repeats: int, memory: bool = True) -> list[dict]:
    """One record per impl (name -> zero-argument callable): median ms and, with memory, the peak
    extra memory of one more call; impls run one after the other, without autograd."""
    out = []
    with torch.no_grad():
        for name, fn in impls.items():
            figures = {"ms": time_ms(fn, device, repeats)}
            if memory:
                figures["peak_extra_mb"] = peak_extra_mb(fn, device)
            out.append(record(bench, case, name, **figures))
    return out


def by_case(records: list[dict], figure: str = "ms") -> dict[str, dict[str, float]]:
    """{"k=v k=v" of the case: {impl: figure}}, in the records' order, for the summary lines."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        key = " ".join(f"{k}={v}" for k, v in r["case"].items())
        out.setdefault(key, {})[r["impl"]] = r[figure]
    return out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def print_table(records: list[dict], figures: tuple[str, ...] = ("ms", "peak_extra_mb"), ratio_to: str | None = None,
                out=None) -> None:
    """One row per record; with ratio_to, a column `x` = that impl's ms / this impl's ms (speed-up of this impl)."""
    out = out if out is not None else sys.stdout   # looked up per call, not at import
    base = {}
    if ratio_to:
        for r in records:
            if r["impl"] == ratio_to and "ms" in r:
                base[json.dumps(r["case"], sort_keys=True)] = r["ms"]
    rows = []
    for r in records:
        case = " ".join(f"{k}={v}" for k, v in r["case"].items())
        cells = [case, r["impl"]]
        for f in figures:
            v = r.get(f)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        if ratio_to:
            b = base.get(json.dumps(r["case"], sort_keys=True))
            cells.append(f"{b / r['ms']:.2f}x" if b and r.get("ms") else "-")
        rows.append(cells)
    header = ["case", "impl", *figures] + ([f"{ratio_to}/impl"] if ratio_to else [])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header), file=out)
    for cells in rows:
        print(fmt.format(*cells), file=out)


def report(records: list[dict], json_path: str | None, lines: list[str] | None = None, **table) -> int:
    """The end of every benchmark: the table (print_table's options), then a blank line and the
    summary lines when there are any to give, then the JSON file. Returns the exit status, 0."""
    print_table(records, **table)
    if lines is not None:
        print()
        for line in lines:
            print(line)
    write_records(records, json_path)
    return 0
