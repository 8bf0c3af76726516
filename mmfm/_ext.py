"""Loads the compiled extension mmfm._C once, and says so when it cannot.

Every op family in mmfm.ops asks `compiled()` whether torch.ops.mmfm can be used. When the
extension is missing or fails to load, the pure-torch references run instead and one
warning (not one per call) says how to build it.
"""
from __future__ import annotations

import os

import warnings

import torch

_STATE: dict = {"tried": False, "module": None, "error": None, "warned": False}

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository "
    "(or `make test`, which creates .venv and builds it)"
)


def _load():
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("MMFM_DISABLE_EXTENSION", "0") == "1":
        _STATE["error"] = "disabled by MMFM_DISABLE_EXTENSION=1"
        return None
    try:
        from mmfm import _C  # noqa: F401  (registers torch.ops.mmfm.*)

        _STATE["module"] = _C
    except (ImportError, OSError) as exc:  # missing .so, ABI mismatch, missing symbol
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
    return _STATE["module"]


def extension_loaded() -> bool:
    """True when mmfm._C is importable and its ops are registered."""
    return _load() is not None


def load_error() -> str | None:
    """Why the extension is not in use, or None when it is."""
    _load()
    return _STATE["error"]


def with_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    mod = _load()
    return bool(mod is not None and getattr(mod, "with_cuda", 0))


def compiled(*tensors: torch.Tensor) -> bool:
    """Whether to call the compiled op for these inputs; warns once when falling back."""
    if _load() is None:
        if not _STATE["warned"]:
            _STATE["warned"] = True
            warnings.warn(
                f"mmfm._C is not available ({_STATE['error']}); mmfm runs its pure-torch reference ops, "
                f"which are slower. To use the compiled ops, {BUILD_HINT}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    if any(t.is_cuda for t in tensors) and not with_cuda():
        if not _STATE["warned"]:
            _STATE["warned"] = True
            warnings.warn(
                "mmfm._C was built without CUDA kernels; CUDA tensors use the pure-torch reference ops. "
                "Rebuild with a CUDA torch and nvcc on PATH to compile them.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def compiled_ops() -> list[str]:
    """Names of the ops registered under torch.ops.mmfm (empty without the extension)."""
    if _load() is None:
        return []
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("mmfm::"))


def _reset_for_tests():
    _STATE.update(warned=False)


__all__ = ["extension_loaded", "load_error", "with_cuda", "compiled", "compiled_ops", "BUILD_HINT"]
