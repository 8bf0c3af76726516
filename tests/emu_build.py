"""Builds the CUDA emulation libraries (tests/cuda_emu) that the *_cuda_emulated tests load: the
.cuh kernels compiled as plain C++ against a stand-in CUDA runtime, cached in the temp folder
under a digest of every source, so an edit to any of them rebuilds."""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def build_emulator(sources: list[str], name: str) -> ctypes.CDLL:
    """sources: repo-relative paths, the first being the translation unit; name: the library's stem."""
    digest = hashlib.sha1()
    for f in sources:
        with open(os.path.join(ROOT, f), "rb") as fh:
            digest.update(fh.read())
    out = os.path.join(tempfile.gettempdir(), f"{name}_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                        "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # _longjmp between fiber stacks
                        "-I", os.path.join(ROOT, "tests", "cuda_emu"), "-I", os.path.join(ROOT, "csrc"),
                        os.path.join(ROOT, sources[0]), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    return ctypes.CDLL(out)
