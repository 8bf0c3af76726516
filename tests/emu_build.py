"""Builds the CUDA emulation libraries (tests/cuda_emu) that the *_cuda_emulated tests load: the
kernels compiled as plain C++ against a stand-in CUDA runtime, cached in the temp folder under a
digest of the named sources, of this file and of every file under csrc/ and tests/cuda_emu/, so
an edit to any header the kernels include rebuilds (a list of includes kept by hand goes stale).

Kernels in .cuh headers (sampling, cache) are included by a wrapper. Kernels in .cu files
(quantization, which launch from the same file) are compiled whole, launchers included: each
.cu is copied with its `kernel<<<grid, block[, smem, stream]>>>(args);` launches rewritten as
`::emu::launch(dim3(grid), dim3(block), [&] { kernel(args); });` (cuda_to_cpp) and compiled as
its own translation unit, since every .cu keeps its helpers in an anonymous namespace."""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def _tree_files() -> list[str]:
    """Repo-relative paths of every file under csrc/ and tests/cuda_emu/, sorted."""
    out = []
    for top in ("csrc", os.path.join("tests", "cuda_emu")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            out.extend(os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files)
    return sorted(out)


def _split_top_level(s: str) -> list[str]:
    """s split at the commas outside brackets. Template arguments are not tracked: a launch
    configuration holds calls and casts, whose commas sit inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_KERNEL_NAME = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*$")


def cuda_to_cpp(text: str, where: str = "source") -> str:
    """text with every `name<<<cfg>>>(args)` launch rewritten for the emulator (see the module
    docstring). Raises ValueError naming `where` for a launch it cannot parse."""
    out, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        m = _KERNEL_NAME.search(text, pos, start)
        close = text.find(">>>", start)
        if m is None or close < 0:
            raise ValueError(f"{where}: cannot parse the launch at offset {start}")
        cfg = _split_top_level(text[start + 3:close])
        i = close + 3
        while text[i].isspace():
            i += 1
        if text[i] != "(" or len(cfg) < 2:
            raise ValueError(f"{where}: launch at offset {start} has no argument list or no block size")
        depth, j = 0, i
        while True:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        out.append(text[pos:m.start(1)])
        stream = f"(void)({cfg[3]}), " if len(cfg) > 3 else ""   # the stream: unused here, but read
        out.append(f"{stream}::emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {m.group(1)}{text[i:j + 1]}; }})")
        pos = j + 1


def build_emulator(sources: list[str], name: str, cuda_sources: tuple[str, ...] = (),
                   defines: dict[str, int] | None = None) -> ctypes.CDLL:
    """sources: repo-relative paths, the first being the wrapper translation unit; cuda_sources:
    .cu files compiled beside it after cuda_to_cpp; defines: -D macros (e.g. a smaller block
    size than the production one); name: the library's stem."""
    flags = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    digest = hashlib.sha1(" ".join(flags).encode())
    for f in list(sources) + list(cuda_sources) + _tree_files() + [os.path.relpath(__file__, ROOT)]:
        digest.update(f.encode())
        with open(os.path.join(ROOT, f), "rb") as fh:
            digest.update(fh.read())
    out = os.path.join(tempfile.gettempdir(), f"{name}_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        units = [os.path.join(ROOT, sources[0])]
        with tempfile.TemporaryDirectory() as gen:
            for cu in cuda_sources:
                with open(os.path.join(ROOT, cu)) as fh:
                    text = cuda_to_cpp(fh.read(), cu)
                unit = os.path.join(gen, os.path.basename(cu)[:-3] + ".emu.cpp")
                with open(unit, "w") as fh:
                    fh.write(f'#line 1 "{cu}"\n' + text)
                units.append(unit)
            proc = subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                                   "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # _longjmp between fiber stacks
                                   "-I", os.path.join(ROOT, "tests", "cuda_emu"), "-I", os.path.join(ROOT, "csrc"),
                                   # Two builds of the same kernels (64 and 512 threads) share symbol
                                   # names, and `__shared__` arrays are static locals of inline
                                   # functions, which GCC makes process-wide unique symbols: with
                                   # both libraries loaded, one would use the other's (smaller)
                                   # arrays. Each library keeps and calls its own.
                                   "-fno-gnu-unique", "-Wl,-Bsymbolic", *flags, *units, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emu_build: {CXX} could not build {sources[0]} (exit {proc.returncode}):\n"
                               f"{proc.stderr}")
        os.replace(tmp, out)
    return ctypes.CDLL(out)
