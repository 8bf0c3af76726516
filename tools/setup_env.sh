#!/usr/bin/env bash
# Creates or reuses the project virtualenv and installs everything `make demo` and
# `make test` need: pinned Python packages (constraints.txt pins torch==2.13.0, a CPU
# build; a GPU user installs a CUDA torch first, see README) and mmfm itself with its
# compiled extension. System packages that later stages need are installed here too.
#
#   VENV=path   where the virtualenv lives (default .venv)
#   PYTHON=exe  interpreter that creates it (default python3.11, else python3)
#   EXTRAS=eval also lm-evaluation-harness and accelerate (`mmfm eval lm`; `make test` sets it: the
#               suite runs lm_eval, and `make demo` does not need its ~20 packages)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Python packages, all pinned. The constraints file keeps pip from pulling a CUDA torch.
stamp="$VENV/.mmfm-deps-$(sha1sum constraints.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing pinned dependencies"
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt "setuptools>=64" wheel
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt \
    deepspeed webdataset sentencepiece safetensors numpy pillow pyyaml tqdm tensorboard ninja \
    scikit-learn pytest vector-quantize-pytorch transformers tokenizers huggingface_hub \
    trimesh scikit-image av soundfile h5py pyarrow
  touch "$stamp"
fi
if [ "${EXTRAS:-}" = eval ] && [ ! -f "$stamp.eval" ]; then
  log "installing the eval extra (lm_eval, accelerate)"
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt lm_eval accelerate
  touch "$stamp.eval"
fi

# System packages: espeak-ng synthesises the demo corpus' speech (mmfm data demo). Installed
# when apt-get exists and we are root; otherwise the demo skips speech and says so.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing espeak-ng (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || log "apt-get install espeak-ng failed; the demo corpus will have no speech samples"
  else
    log "espeak-ng not found and cannot apt-get install it (needs root and apt); the demo corpus will have no speech samples"
  fi
fi

# The extension: rebuilt by ninja only where sources changed.
log "building mmfm and its extension (pip install --no-build-isolation -e .)"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e .
"$PY" -c "import mmfm, sys; sys.exit(0 if mmfm.ops.extension_loaded() else 1)" || {
  log "mmfm._C did not load after the build; see the warning above"
  exit 1
}
log "ready: $VENV"
