"""Builds the CUDA emulation libraries (tests/cuda_emu) that the *_cuda_emulated tests load: the
.cuh kernels compiled as plain C++ against a stand-in CUDA runtime, cached in the temp folder
under a digest of the named sources and of every file under csrc/ and tests/cuda_emu/, so an
edit to any header the kernels include rebuilds (a list of includes kept by hand goes stale)."""
import ctypes
import hashlib
import os
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


def build_emulator(sources: list[str], name: str) -> ctypes.CDLL:
    """sources: repo-relative paths, the first being the translation unit; name: the library's stem."""
    digest = hashlib.sha1()
    for f in sources + _tree_files():
        digest.update(f.encode())
        with open(os.path.join(ROOT, f), "rb") as fh:
            digest.update(fh.read())
    out = os.path.join(tempfile.gettempdir(), f"{name}_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        proc = subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                               "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # _longjmp between fiber stacks
                               "-I", os.path.join(ROOT, "tests", "cuda_emu"), "-I", os.path.join(ROOT, "csrc"),
                               os.path.join(ROOT, sources[0]), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emu_build: {CXX} could not build {sources[0]} (exit {proc.returncode}):\n"
                               f"{proc.stderr}")
        os.replace(tmp, out)
    return ctypes.CDLL(out)
