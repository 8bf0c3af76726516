#!/usr/bin/env python3
"""Compiles every CUDA kernel (csrc/**/*.cu) with nvcc, and the CUDA side of every binding
(csrc/*/*_binding.cpp under -DMMFM_WITH_CUDA) syntax-only, without a GPU or a CUDA torch.

The .cu files are written against raw pointers and include no torch header (see
docs/architecture.md), so nvcc alone can build them. This catches kernels that do not
compile, for every target architecture, on a machine that has nvcc but no GPU (CI).

The bindings' `#ifdef MMFM_WITH_CUDA` blocks need torch's c10/cuda headers, which the CPU
wheel ships except for one file a CUDA build of torch generates,
c10/cuda/impl/cuda_cmake_macros.h; tools/cuda_syntax_include/ holds a stand-in for exactly
that file. Each binding is then compiled by the host compiler with -fsyntax-only against the
running Python's torch headers, the CUDA toolkit's include folder and that stand-in: a typo
or a wrong call in a CUDA-only block fails here, not on the first GPU build. It needs the
torch of the Python running this script (the project's venv).

    python3 tools/check_cuda.py                    # all csrc/**/*.cu, sm_80 and sm_90, and the bindings
    python3 tools/check_cuda.py csrc/quant/fsq_cuda.cu --arch 90
    python3 tools/check_cuda.py --nvcc /usr/local/cuda/bin/nvcc --jobs 4
    python3 tools/check_cuda.py --bindings-only    # only the bindings' CUDA blocks (seconds)

Warnings are errors (host: -Wall -Werror, device: --Werror all-warnings). Object files go to
a temporary directory that is removed afterwards. One line per file with its time; on
failure nvcc's output is printed and the exit status is 1. Without nvcc the exit status is
1, or 0 with --allow-missing (for machines that cannot have it).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


def cuda_sources() -> list[str]:
    out = []
    for dirpath, _, files in os.walk(CSRC):
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".cu"))
    return sorted(out)


def nvcc_command(nvcc: str, src: str, obj: str, archs: list[str]) -> list[str]:
    cmd = [nvcc, "-std=c++17", "-O3", "-I", CSRC]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # Warnings are errors on both sides: the host compiler's and nvcc's own (device code).
    cmd += ["-Xcompiler", "-Wall,-Werror", "--Werror", "all-warnings", "-c", src, "-o", obj]
    return cmd


def compile_one(nvcc: str, src: str, outdir: str, archs: list[str], timeout: float) -> tuple[str, bool, float, str]:
    rel = os.path.relpath(src, ROOT)
    obj = os.path.join(outdir, rel.replace(os.sep, "_") + ".o")
    cmd = nvcc_command(nvcc, src, obj, archs)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        ok, log = proc.returncode == 0, proc.stdout
        if not ok:
            log = f"$ {' '.join(cmd)}\n{log}(exit status {proc.returncode})\n"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        ok, log = False, f"$ {' '.join(cmd)}\n{out}timed out after {timeout:.0f} s\n"
    return rel, ok, time.monotonic() - t0, log


def binding_sources() -> list[str]:
    return sorted(os.path.join(CSRC, d, f) for d in os.listdir(CSRC) if os.path.isdir(os.path.join(CSRC, d))
                  for f in os.listdir(os.path.join(CSRC, d)) if f.endswith("_binding.cpp"))


def cuda_include_dir(nvcc: str) -> str | None:
    """The CUDA toolkit's include folder (holding cuda_runtime_api.h) that goes with nvcc."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in cands:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def binding_command(cxx: str, src: str, cuda_include: str) -> list[str]:
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-DMMFM_WITH_CUDA", "-I", CSRC,
           "-I", os.path.join(ROOT, "tools", "cuda_syntax_include")]
    for inc in include_paths() + [cuda_include, sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]  # torch's own headers warn under -Wall; ours must not
    return cmd + [src]


def check_bindings(nvcc: str, sources: list[str], timeout: float = 600.0) -> list[tuple[str, str]]:
    """Syntax-only compile of each binding with MMFM_WITH_CUDA; returns (file, log) of each failure."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or "g++"
    inc = cuda_include_dir(nvcc)
    if inc is None:
        return [("(all bindings)", f"no CUDA include folder with cuda_runtime_api.h found for {nvcc} "
                                   "(set CUDA_HOME)")]
    failed = []
    for src in sources:
        rel = os.path.relpath(src, ROOT)
        cmd = binding_command(cxx, src, inc)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            ok, out, code = proc.returncode == 0 and " warning: " not in proc.stdout, proc.stdout, proc.returncode
        except subprocess.TimeoutExpired:
            ok, out, code = False, f"timed out after {timeout:.0f} s\n", "timeout"
        print(f"  {'ok  ' if ok else 'FAIL'} {time.monotonic() - t0:6.1f} s  {rel} (-DMMFM_WITH_CUDA, syntax only)",
              flush=True)
        if not ok:
            failed.append((rel, f"$ {' '.join(cmd)}\n{out}(exit status {code})\n"))
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="the .cu files to compile (default: every csrc/**/*.cu)")
    p.add_argument("--nvcc", metavar="PATH", help="nvcc to use (default: nvcc on PATH, then $CUDA_HOME/bin)")
    p.add_argument("--arch", action="append", metavar="SM",
                   help="compute capability to build for, e.g. 90; repeatable (default: 80 and 90)")
    p.add_argument("--jobs", type=int, default=2, help="files compiled in parallel (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per file (default 600)")
    p.add_argument("--allow-missing", action="store_true", help="exit 0 when nvcc is not found")
    p.add_argument("--bindings-only", action="store_true",
                   help="only syntax-check the bindings' MMFM_WITH_CUDA blocks (files: the bindings to check)")
    p.add_argument("--no-bindings", action="store_true", help="skip the bindings' syntax check")
    args = p.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        where = f"at {args.nvcc}" if args.nvcc else "on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
        print(f"check_cuda: nvcc not found {where}; CUDA kernels not compiled"
              + (" (--allow-missing: not an error)" if args.allow_missing else ""))
        return 0 if args.allow_missing else 1

    if args.bindings_only:
        sources = [os.path.abspath(f) for f in args.files] if args.files else binding_sources()
        print(f"check_cuda: {len(sources)} binding(s), -DMMFM_WITH_CUDA, syntax only")
        failed = check_bindings(nvcc, sources, args.timeout)
        for rel, log in failed:
            print(f"\n---- compiler output for {rel} ----\n{log.rstrip()}")
        print(f"check_cuda: {len(failed)} of {len(sources)} failed" if failed
              else f"check_cuda: all {len(sources)} bindings compiled (syntax only)")
        return 1 if failed else 0

    sources = [os.path.abspath(f) for f in args.files] if args.files else cuda_sources()
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing:
        print("check_cuda: no such file: " + ", ".join(missing))
        return 1
    if not sources:
        print("check_cuda: no .cu files under csrc/")
        return 0
    archs = [a.replace("sm_", "").replace("compute_", "") for a in (args.arch or ["80", "90"])]
    try:
        version = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=60).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "version unknown"
    print(f"check_cuda: {len(sources)} file(s), {nvcc} ({version}), sm_{', sm_'.join(archs)}, {args.jobs} job(s)")

    t0 = time.monotonic()
    failed = []
    with tempfile.TemporaryDirectory(prefix="mmfm_check_cuda_") as outdir:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(compile_one, nvcc, s, outdir, archs, args.timeout) for s in sources]
            for fut in concurrent.futures.as_completed(futures):
                rel, ok, secs, log = fut.result()
                print(f"  {'ok  ' if ok else 'FAIL'} {secs:6.1f} s  {rel}", flush=True)
                if not ok:
                    failed.append((rel, log))
    if not args.files and not args.no_bindings:
        failed += check_bindings(nvcc, binding_sources(), args.timeout)
    for rel, log in failed:
        print(f"\n---- compiler output for {rel} ----\n{log.rstrip()}")
    status = f"{len(failed)} failed" if failed else f"all {len(sources)} compiled, and the bindings' CUDA blocks"
    print(f"check_cuda: {status} in {time.monotonic() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
