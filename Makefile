# The two commands of the README quickstart. Both create or reuse .venv, install the pinned
# dependencies and build the extension (tools/setup_env.sh), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: demo test setup check-cuda bench clean

setup:
	VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(VENV)/bin/mmfm doctor
	$(VENV)/bin/mmfm demo e2e --out runs/demo

# The whole test suite; .ci/run runs this same target in a fresh clone. Its setup adds the eval
# extra (lm-evaluation-harness), which tests/test_hf_export.py runs.
test:
	VENV=$(VENV) EXTRAS=eval bash tools/setup_env.sh
	@if command -v nvcc >/dev/null 2>&1; then $(PY) tools/check_cuda.py; else echo "nvcc not found: CUDA compile check skipped"; fi
	$(PY) -m pytest -q tests

check-cuda:
	$(PY) tools/check_cuda.py

bench: setup
	$(VENV)/bin/mmfm bench quant --json runs/bench_quant.json

clean:
	rm -rf build mmfm/_C*.so *.egg-info
