"""`mmfm doctor`: what this install has, and whether it is broken.

Prints Python, torch (CUDA build or not), DeepSpeed and its accelerator, webdataset,
sentencepiece, flash-attn, whether mmfm._C loaded and its ops, OpenMP threads, nvcc, and the peak
memory of the latest training run (the last `peak_memory_mb` of its metrics.jsonl: CUDA allocator
peak or CPU peak RSS, as the row's `peak_memory_kind` says; mmfm/train/metrics.py).
Optional pieces that are absent (flash-attn without CUDA, nvcc, the compiled extension
when the references can run) are reported, not failures. The exit code is non-zero only
for a broken install: a required package that does not import.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys

REQUIRED = ("torch", "deepspeed", "webdataset", "sentencepiece", "safetensors", "numpy", "PIL", "yaml", "tqdm")


def _version(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # a broken package can raise anything on import
        return False, f"missing ({type(exc).__name__}: {exc})"
    return True, str(getattr(mod, "__version__", "installed"))


def _deepspeed_accelerator() -> str:
    # Importing deepspeed.accelerator picks one (cuda, cpu, ...); DS_ACCELERATOR overrides.
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def _nvcc() -> str:
    path = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
    if not path or not os.path.exists(path):
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        release = [line for line in out.splitlines() if "release" in line]
        return f"{path} ({release[-1].strip() if release else 'unknown version'})"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path} (did not run: {exc})"


def latest_metrics(run: str = "", root: str = "runs") -> str | None:
    """metrics.jsonl of `run` (a training output folder), or the newest one up to 3 levels under root."""
    import glob

    if run:
        path = os.path.join(run, "metrics.jsonl")
        return path if os.path.exists(path) else None
    found = [p for depth in range(1, 4) for p in glob.glob(os.path.join(root, *["*"] * depth, "metrics.jsonl"))]
    return max(found, key=os.path.getmtime) if found else None


def peak_memory_row(run: str = "") -> tuple[str, str]:
    """("peak memory", what the latest run logged) for the report."""
    import json

    path = latest_metrics(run)
    if path is None:
        where = os.path.join(run, "metrics.jsonl") if run else "./runs"
        return "peak memory", f"no training metrics found ({where}); a training run logs peak_memory_mb per row"
    last = None
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "peak_memory_mb" in row:
                last = row
    if last is None:
        return "peak memory", f"{path} has no peak_memory_mb (a run from before it was logged)"
    return "peak memory", (f"{last['peak_memory_mb']:.1f} MB ({last.get('peak_memory_kind', 'unknown kind')}) "
                           f"at step {last.get('step')} of {path}")


def report(run: str = "") -> tuple[list[tuple[str, str]], list[str]]:
    """Rows (name, value) to print and the list of problems that make the install broken."""
    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    rows.append(("python", f"{platform.python_version()} ({sys.executable})"))
    rows.append(("platform", f"{platform.platform()}, {os.cpu_count()} cores"))
    versions = {name: _version(name) for name in REQUIRED}
    for name, (ok, ver) in versions.items():
        if not ok:
            problems.append(f"required package {name} does not import: {ver}")
    if versions["torch"][0]:
        import torch

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        devices = f", {torch.cuda.device_count()} GPU(s) visible" if torch.version.cuda else ""
        rows.append(("torch", f"{torch.__version__} ({cuda}{devices})"))
        rows.append(("openmp threads", f"{torch.get_num_threads()} (torch.get_num_threads; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"))
    else:
        rows.append(("torch", versions["torch"][1]))
    ds_ok, ds_ver = versions["deepspeed"]
    rows.append(("deepspeed", f"{ds_ver}, accelerator {_deepspeed_accelerator()}" if ds_ok else ds_ver))
    for name in ("webdataset", "sentencepiece", "safetensors", "numpy"):
        rows.append((name, versions[name][1]))
    fa_ok, fa_ver = _version("flash_attn")
    rows.append(("flash-attn", fa_ver if fa_ok else "not available (optional; SDPA is used)"))

    if versions["torch"][0]:
        from mmfm import _ext

        if _ext.extension_loaded():
            ops = _ext.compiled_ops()
            kind = "with CUDA kernels" if _ext.with_cuda() else "CPU kernels"
            rows.append(("mmfm._C", f"loaded ({kind}), {len(ops)} ops"))
            rows.append(("compiled ops", ", ".join(ops)))
        else:
            rows.append(("mmfm._C", f"NOT loaded: {_ext.load_error()}; reference ops run. {_ext.BUILD_HINT}"))
    rows.append(("nvcc", _nvcc()))
    rows.append(peak_memory_row(run))
    return rows, problems


def main(args=None) -> int:
    rows, problems = report(getattr(args, "run", "") or "")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for p in problems:
        print(f"BROKEN: {p}", file=sys.stderr)
    print("status" + " " * (width - 4) + ("broken install" if problems else "ok"))
    return 1 if problems else 0
