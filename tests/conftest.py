import os

import pytest
import torch

# Tests are sized for 2 cores; keep torch from oversubscribing when pytest runs in parallel.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_report_header(config):
    from mmfm import _ext

    state = "loaded" if _ext.extension_loaded() else f"NOT loaded ({_ext.load_error()})"
    return f"mmfm._C: {state}; torch {torch.__version__}"


@pytest.fixture
def needs_extension():
    from mmfm import _ext

    if not _ext.extension_loaded():
        pytest.fail(f"mmfm._C must be built for this test: {_ext.load_error()}")


@pytest.fixture
def run_without_extension():
    """run(script) -> CompletedProcess: `python -c script` from the repository root with
    MMFM_DISABLE_EXTENSION=1 (every op on its pure-torch reference), stdout and stderr together."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script: str):
        env = dict(os.environ, MMFM_DISABLE_EXTENSION="1", OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)
    return run
