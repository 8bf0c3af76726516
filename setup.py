"""Builds mmfm._C with torch's BuildExtension (ninja).

Every csrc/**/*.cpp is compiled with -O3 and OpenMP. When the installed torch is a
CUDA build and nvcc is found, every csrc/**/*.cu is compiled too (TORCH_CUDA_ARCH_LIST
is honoured; no GPU is needed at build time) and MMFM_WITH_CUDA is defined so the
bindings register the CUDA kernels.

The shipped configs (configs/: models, tokenizers, pretrain, finetune, cacheaug, deepspeed) go
into the package as mmfm/configs, so an installed mmfm finds the configs its demo and benchmarks
use (mmfm.typed_config.packaged_config); an editable install reads configs/ in the checkout.

Environment knobs:
  MMFM_CPU_ARCH   value for -march (default "native": the extension is built where it runs;
                  set e.g. "x86-64-v3" to build for other machines, or "" to drop the flag)
  MMFM_NO_CUDA=1  build the CPU extension even when CUDA torch and nvcc are present
  MMFM_PREBUILT=1 compile nothing: package the mmfm/_C*.so already built in this tree (a wheel
                  for this machine and this torch, e.g. tests/test_wheel.py's)
"""
import glob
import os
import platform
import shutil

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME

    cxx = ["-O3", "-fopenmp", "-std=c++17", "-Wall", "-Wno-unknown-pragmas"]
    arch = os.environ.get("MMFM_CPU_ARCH", "native")
    if arch and platform.machine() in ("x86_64", "AMD64"):
        cxx.append(f"-march={arch}")
    link = ["-fopenmp"]
    sources = _sources("*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    with_cuda = (
        torch.version.cuda is not None
        and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
        and os.environ.get("MMFM_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        return [
            CUDAExtension(
                "mmfm._C",
                sources + _sources("*.cu"),
                include_dirs=include_dirs,
                define_macros=[("MMFM_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "mmfm._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/ to mmfm/configs in the build (not for editable installs,
    which read configs/ in place)."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "configs")
        if not getattr(self, "editable_mode", False) and os.path.isdir(src):
            shutil.copytree(src, os.path.join(self.build_lib, "mmfm", "configs"), dirs_exist_ok=True)


class BinaryDistribution(Distribution):
    """A platform wheel even when the extension is packaged prebuilt rather than compiled here."""

    def has_ext_modules(self):
        return True


def _prebuilt() -> dict:
    built = glob.glob(os.path.join(ROOT, "mmfm", "_C*.so")) + glob.glob(os.path.join(ROOT, "mmfm", "_C*.pyd"))
    if not built:
        raise SystemExit("setup.py: MMFM_PREBUILT=1 needs the extension built in this tree (mmfm/_C*.so); "
                         "build it first with pip install --no-build-isolation -e .")
    return dict(package_data={"mmfm": [os.path.basename(p) for p in built]}, distclass=BinaryDistribution,
                cmdclass={"build_py": BuildPyWithConfigs})


def _compiled() -> dict:
    from torch.utils.cpp_extension import BuildExtension

    return dict(ext_modules=_extensions(),
                cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithConfigs})


setup(**(_prebuilt() if os.environ.get("MMFM_PREBUILT", "0") == "1" else _compiled()))
