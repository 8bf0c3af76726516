"""Shared pieces of the benchmarks in mmfm/bench: arguments, the compiled-op checks, timing,
memory, agreement checks, records, table, JSON.

Each benchmark module exposes `main(argv=None) -> int` and is run through `mmfm bench NAME` or
`python -m mmfm.bench.NAME`. Records follow docs/records.md: flat dicts with `bench`, `case`,
`impl`, a timing (`ms`, the median) and optionally `cpu_ms` and `peak_extra_mb`.

Two rules every benchmark keeps, enforced here:
- `--device` is honoured or refused: parse_args rejects a value that is not cpu / cuda / cuda:N,
  a CUDA device without a visible GPU, and any device but the CPU for a benchmark that measures
  only the CPU, each with an error that names --device.
- an impl named `mmfm` is the compiled op: parse_args refuses to start when mmfm._C is not loaded
  (or, for --device cuda, was built without CUDA kernels), and `require_compiled` runs the `mmfm`
  impl once under torch's profiler and raises CompiledOpNotRun unless a torch.ops.mmfm op ran,
  which catches a wrapper that falls back to the reference for some inputs. Without these the
  benchmark would time the pure-torch reference under the mmfm name.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable

import torch

from mmfm import _ext
from mmfm.jsonio import write_records

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class CompiledOpNotRun(RuntimeError):
    """The `mmfm` impl of a benchmark did not call any torch.ops.mmfm op."""


def base_parser(name: str, description: str, threads_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes; `--threads` too when threads_help is given."""
    p = argparse.ArgumentParser(prog=f"mmfm bench {name}", description=description)
    p.add_argument("--json", metavar="PATH", help="also write the records as a JSON list to PATH")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (rounds) per case; the median is reported")
    p.add_argument("--quick", action="store_true", help="smaller cases, for smoke tests")
    if threads_help:
        p.add_argument("--threads", type=int, default=0, help=f"torch threads ({threads_help})")
    return p


def compiled_unavailable(device: str) -> str | None:
    """Why the compiled ops cannot run on `device`, or None when they can."""
    if not _ext.extension_loaded():
        return (f"the compiled extension mmfm._C is not loaded ({_ext.load_error()}), so the mmfm impls "
                f"would run the pure-torch references; {_ext.BUILD_HINT}")
    if device.startswith("cuda") and not _ext.with_cuda():
        return (f"--device {device}: mmfm._C was built without CUDA kernels, so the mmfm impls would run the "
                f"pure-torch references on the GPU; rebuild with a CUDA torch and nvcc on PATH")
    return None


def parse_args(p: argparse.ArgumentParser, argv, cpu_only: str | None = None,
               compiled: bool = True) -> argparse.Namespace | None:
    """Parsed arguments with --threads applied, or None (the caller exits 2) after printing why
    the benchmark cannot run as asked. `cpu_only`: the benchmark's reason to measure the CPU only
    (any other --device is refused). `compiled`: whether its `mmfm` impls are compiled ops, which
    must then be loadable for the device (see the module docstring)."""
    args = p.parse_args(argv)
    if not _DEVICE.match(args.device):
        print(f"{p.prog}: --device must be cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return None
    if cpu_only and args.device != "cpu":
        print(f"{p.prog}: --device {args.device} is not supported: only --device cpu is {cpu_only}", file=sys.stderr)
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{p.prog}: --device {args.device} needs a visible GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return None
    if compiled:
        why = compiled_unavailable(args.device)
        if why:
            print(f"{p.prog}: refusing to run: {why}", file=sys.stderr)
            return None
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "repeats", 1) < 1:
        print(f"{p.prog}: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return None
    return args


def mmfm_ops_run(fn: Callable[[], object]) -> set[str]:
    """Names of the torch.ops.mmfm ops that one call of fn() dispatched (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mmfm::")}


def require_compiled(fn: Callable[[], object], what: str) -> set[str]:
    """Run fn once and raise CompiledOpNotRun unless it called a compiled op; returns their names."""
    ran = mmfm_ops_run(fn)
    if not ran:
        raise CompiledOpNotRun(f"{what}: the mmfm impl ran no torch.ops.mmfm op (it fell back to the pure-torch "
                               f"reference); refusing to time it under the mmfm name. Extension: "
                               f"{_ext.load_error() or 'loaded'}")
    return ran


def check_agree(outputs: dict[str, torch.Tensor], what: str, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Raise AssertionError unless every impl's output equals the first one's (within atol/rtol)."""
    names = list(outputs)
    ref = outputs[names[0]]
    for name in names[1:]:
        out = outputs[name]
        if out.shape != ref.shape:
            raise AssertionError(f"{what}: impl {name} returned shape {tuple(out.shape)}, {names[0]} {tuple(ref.shape)}")
        if not torch.allclose(out.to(ref.dtype), ref, atol=atol, rtol=rtol, equal_nan=True):
            diff = (out.double() - ref.double()).abs().max().item()
            raise AssertionError(f"{what}: impl {name} disagrees with {names[0]} (max abs difference {diff:g})")


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


def interleaved(impls: dict[str, Callable[[], object]], device: str, rounds: int, inner: int = 1,
                warmup: int = 1) -> dict[str, dict[str, float]]:
    """{impl: {"ms": ..., "cpu_ms": ...}}: per-call medians over `rounds`, each round timing every
    impl once in turn (a, b, c, a, b, c, ...) as a loop of `inner` calls, so load from other
    processes falls on every impl alike and the ratios stay meaningful on a busy machine.
    cpu_ms is this process's CPU time per call (time.process_time, all threads): with one
    thread it excludes the time spent waiting for a core, which wall time includes."""
    for fn in impls.values():   # warm-up (allocator, first touch, thread pools)
        for _ in range(warmup):
            fn()
    _sync(device)
    wall: dict[str, list[float]] = {n: [] for n in impls}
    cpu: dict[str, list[float]] = {n: [] for n in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            wall[name].append((time.perf_counter() - t0) * 1e3 / inner)
            cpu[name].append((time.process_time() - c0) * 1e3 / inner)
    return {n: {"ms": statistics.median(wall[n]), "cpu_ms": statistics.median(cpu[n])} for n in impls}


class TrainSteps:
    """AdamW training steps of one model, the runner of the training benchmarks: each step takes the
    next of `batches` ((ids, tokens it counts) pairs, cycled), runs loss(ids).backward() and the
    optimizer step, and with keep=True records its wall time and token count."""

    def __init__(self, model, loss: Callable[[torch.Tensor], torch.Tensor], batches: list,
                 lr: float = 1e-4, weight_decay: float = 0.01):
        self.model, self.loss, self.batches = model, loss, batches
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
        self.i, self.times, self.tokens = 0, [], []

    def step(self, keep: bool = True) -> float:
        """One step; its wall time in seconds."""
        ids, counted = self.batches[self.i % len(self.batches)]
        self.i += 1
        t0 = time.perf_counter()
        self.loss(ids).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if keep:
            self.times.append(dt)
            self.tokens.append(counted)
        return dt

    def reset(self) -> None:
        """Forget the recorded steps (a new measuring window)."""
        self.times, self.tokens = [], []

    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.times)


def interleaved_blocks(steps: list[Callable[..., object]], n: int, block: int = 2, warmup: int = 1) -> None:
    """Calls every step function `warmup` times untimed (step(keep=False)), then n times recorded
    (step()) in alternating blocks of `block` (a a b b a a b b ...): `interleaved` for stateful
    steps such as training, where each call must advance the runner and a block amortises the
    cache and allocator state a switch between models disturbs."""
    for step in steps:
        for _ in range(warmup):
            step(keep=False)
    done = 0
    while done < n:
        k = min(block, n - done)
        for step in steps:
            for _ in range(k):
                step()
        done += k


def peak_extra_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory fn() allocates through torch's allocator beyond what was in use before it, MiB.

    CUDA: the caching allocator's peak statistic. CPU: the running sum of the allocation and
    free events torch's profiler records for the CPU allocator (profile_memory), so a transient
    N x K buffer counts in full however briefly it lives. Memory a C++ kernel takes outside
    torch's allocator (std::vector scratch) is not seen; the ops' docs state those bounds.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0.0, (torch.cuda.max_memory_allocated() - before) / 2**20)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def record(bench: str, case: dict, impl: str, **figures) -> dict:
    return {"bench": bench, "case": dict(case), "impl": impl, **figures}


def time_impls(bench: str, case: dict, impls: dict, device: str, repeats: int, memory: bool = True,
               inner: int = 1) -> list[dict]:
    """One record per impl (name -> zero-argument callable), without autograd: `ms` and `cpu_ms`
    from interleaved rounds and, with memory, the peak extra memory of one more call."""
    out = []
    with torch.no_grad():
        times = interleaved(impls, device, repeats, inner)
        for name, fn in impls.items():
            figures = dict(times[name])
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


def print_table(records: list[dict], figures: tuple[str, ...] = ("ms", "peak_extra_mb"),
                ratio_to: str | tuple[str, ...] | None = None, out=None) -> None:
    """One row per record; with ratio_to, a column = the baseline's ms / this impl's ms (speed-up of
    this impl). ratio_to names the baseline impl, or several: the fastest of them in each case."""
    out = out if out is not None else sys.stdout   # looked up per call, not at import
    names = (ratio_to,) if isinstance(ratio_to, str) else tuple(ratio_to or ())
    base: dict[str, float] = {}
    for r in records:
        if r["impl"] in names and r.get("ms"):
            key = json.dumps(r["case"], sort_keys=True)
            base[key] = min(base.get(key, float("inf")), r["ms"])
    rows = []
    for r in records:
        case = " ".join(f"{k}={v}" for k, v in r["case"].items())
        cells = [case, r["impl"]]
        for f in figures:
            v = r.get(f)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        if names:
            b = base.get(json.dumps(r["case"], sort_keys=True))
            cells.append(f"{b / r['ms']:.2f}x" if b and r.get("ms") else "-")
        rows.append(cells)
    header = ["case", "impl", *figures] + ([f"{'|'.join(names)}/impl"] if names else [])
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
