#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU: build mmfm._C with its CUDA kernels, run the
# CUDA tests, run the quant, sampling and cache kernels under compute-sanitizer, and run every
# op benchmark (quant, sampling, cache) on the GPU. Made for a fresh, offline machine
# (nothing is installed: what is missing is reported). Stays under 9.5 minutes: every step
# has its own time limit, cut further to fit a global deadline. The script is a sequence of
# numbered stages; a new stage goes before the final RESULT lines and sets FAILED=1 on failure.
#
#   tools/gpu_check.sh OUTDIR
#
# Writes into OUTDIR: summary.txt (one line per step), env.txt, nvidia-smi.txt, nvcc.txt,
# build.log, pytest_cuda.log, junit_cuda.xml, sanitizer_{memcheck,racecheck}.log,
# bench_{quant,sampling,cache}_cuda.{log,json}.
# Exit status: non-zero when the build fails, the extension lacks its CUDA kernels, a test
# fails, compute-sanitizer reports an error, times out, crashes or cannot run, or a benchmark
# fails or times out (a benchmark that cannot run on the GPU has measured nothing); 0 only
# when every stage ran to the end and passed. A skipped stage (no time left) is a failure too.
#
# Environment:
#   PYTHON                interpreter (default: python3)
#   TORCH_CUDA_ARCH_LIST  architectures to build (default "9.0")
#   MAX_JOBS              parallel compile jobs (default: number of CPUs)
#   GPU_CHECK_BUDGET_S    overall deadline in seconds (default 560)
#   GPU_CHECK_SANITIZER=0 skip the compute-sanitizer steps (reported, and the result says so)
set -o pipefail
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-560}
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
FAILED=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# Seconds a step may take: its own limit, cut to what is left of the budget (minus a
# reserve for the steps after it). Prints 0 when nothing is left.
limit() {
  local want=$1 reserve=${2:-0} left
  left=$((BUDGET - ($(date +%s) - START) - reserve))
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 0 ] && want=0
  echo "$want"
}

# step NAME SECONDS LOGFILE CMD...: runs CMD with a timeout, output to the console and LOGFILE.
step() {
  local name=$1 secs=$2 logfile=$3 t0 rc
  shift 3
  if [ "$secs" -le 0 ]; then
    log "$name: SKIPPED (no time left in the ${BUDGET}s budget) -- counted as a failure"
    return 124
  fi
  t0=$(date +%s)
  log "$name: start (limit ${secs}s): $*"
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$logfile"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "$name: TIMEOUT after $(($(date +%s) - t0))s (log: $logfile)"
  else
    log "$name: exit $rc after $(($(date +%s) - t0))s (log: $logfile)"
  fi
  return $rc
}

# ---- 1. environment --------------------------------------------------------------------
{ nvidia-smi 2>&1 || echo "nvidia-smi failed or is missing"; } >"$OUTDIR/nvidia-smi.txt"
NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
      NVCC="$d/bin/nvcc"
      break
    fi
  done
fi
if [ -n "$NVCC" ]; then
  "$NVCC" --version >"$OUTDIR/nvcc.txt" 2>&1
  # torch's build needs the toolkit root (include/, lib64/); nvcc may be a wrapper script
  # outside it, so take the first candidate that holds the headers.
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
      if [ -f "$d/include/cuda_runtime.h" ]; then
        export CUDA_HOME="$d"
        break
      fi
    done
  fi
  export PATH="$(dirname "$NVCC"):$PATH"
else
  echo "nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >"$OUTDIR/nvcc.txt"
fi
log "nvidia-smi: $(head -n 20 "$OUTDIR/nvidia-smi.txt" | grep -m1 -E 'NVIDIA|failed' || echo '?')"
log "nvcc: $(tail -n 1 "$OUTDIR/nvcc.txt")"
log "source: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata'), $(git status --short 2>/dev/null | wc -l) changed file(s)"

timeout 60 "$PY" - >"$OUTDIR/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
print("platform", platform.platform())
missing = []
for name, needed in [("torch", True), ("pytest", True), ("setuptools", True), ("ninja", False), ("numpy", False),
                     ("wheel", False)]:
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", f"({type(exc).__name__}: {exc})")
        if needed:
            missing.append(name)
try:
    import torch
    print("torch.version.cuda", torch.version.cuda)
    print("cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.multi_processor_count} SMs", f"{p.total_memory >> 20} MiB")
    if torch.version.cuda is None:
        missing.append("a CUDA build of torch (torch.version.cuda is None)")
    elif not torch.cuda.is_available():
        missing.append("a usable GPU (torch.cuda.is_available() is False)")
except Exception:  # noqa: BLE001
    pass
print("MISSING:", ", ".join(missing) if missing else "nothing")
sys.exit(1 if missing else 0)
EOF
ENV_RC=$?
cat "$OUTDIR/env.txt"
if [ $ENV_RC -ne 0 ]; then
  log "environment: $(grep '^MISSING:' "$OUTDIR/env.txt" || echo 'python failed, see env.txt') -- cannot build or test"
  exit 1
fi
if [ -z "$NVCC" ]; then
  log "environment: nvcc missing -- setup.py would build the CPU-only extension; stopping"
  exit 1
fi
log "environment ok: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"

# ---- 2. build (in place: no pip, no network, no dependency resolution) ------------------
# Reserve for the steps after it: tests, sanitizer and benchmark (each is cut again later).
step build "$(limit 300 260)" "$OUTDIR/build.log" "$PY" setup.py build_ext --inplace
BUILD_RC=$?
if [ $BUILD_RC -ne 0 ]; then
  log "build FAILED (exit $BUILD_RC); see build.log"
  exit 1
fi
if ! timeout 120 "$PY" -c "import sys, mmfm; sys.exit(0 if mmfm.ops.with_cuda() else 1)" >>"$OUTDIR/build.log" 2>&1; then
  log "build produced an extension WITHOUT CUDA kernels (mmfm.ops.with_cuda() is False or import failed); see build.log"
  exit 1
fi
log "extension loaded with CUDA kernels"

# ---- 3. CUDA tests ------------------------------------------------------------------------
mapfile -t TESTS < <(ls tests/test_*_cuda.py 2>/dev/null)
if [ ${#TESTS[@]} -eq 0 ]; then
  log "tests: no tests/test_*_cuda.py found"
  FAILED=1
else
  # The compile check (nvcc only) runs in CI; here the build above already compiled every .cu.
  step pytest "$(limit 180 220)" "$OUTDIR/pytest_cuda.log" \
    "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml "$OUTDIR/junit_cuda.xml" \
    -k "not test_cuda_sources_compile" "${TESTS[@]}"
  rc=$?
  [ $rc -ne 0 ] && FAILED=1
fi

# ---- 4. compute-sanitizer on small calls of every CUDA op --------------------------------
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x "${CUDA_HOME}/bin/compute-sanitizer" ] && SAN="${CUDA_HOME}/bin/compute-sanitizer"
if [ "${GPU_CHECK_SANITIZER:-1}" = "0" ]; then
  log "sanitizer: skipped (GPU_CHECK_SANITIZER=0) -- counted as a failure: the kernels were not sanitized"
  FAILED=1
elif [ -z "$SAN" ]; then
  log "sanitizer: compute-sanitizer not found -- counted as a failure: the kernels were not sanitized"
  FAILED=1
else
  cat >"$OUTDIR/sanitizer_driver.py" <<'EOF'
# Small calls of every CUDA op, covering each kernel path (quant: top-1, top-k, split codebook,
# cosine, bf16, exact and factorised entropy; sampling: each filter, greedy, penalties, masks,
# both verifications; cache: append, insert, gather at every access width). Run under
# compute-sanitizer.
import torch
import mmfm  # noqa: F401
ops = torch.ops.mmfm
dev = "cuda"
g = torch.Generator(device="cpu").manual_seed(0)
def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype).to(dev)
for dtype in (torch.float32, torch.bfloat16):
    for N, K, D in ((1, 1, 13), (70, 300, 13), (3, 3000, 16)):
        for topk in (1, 5):
            for cosine in (False, True):
                if topk <= K:
                    ops.nearest_code(rnd(N, D, dtype=dtype), rnd(K, D, dtype=dtype), topk, cosine)
    z = rnd(500, 6, dtype=dtype)
    idx = torch.randint(0, 37, (500,), generator=g).to(dev)
    ops.code_stats(z, idx, 37)
    ops.fsq_quantize(rnd(300, 4, dtype=dtype), torch.tensor([8, 5, 5, 5]))
    ops.lfq_quantize(rnd(300, 10, dtype=dtype))
    ops.residual_vq(rnd(200, 7, dtype=dtype), rnd(3, 50, 7, dtype=dtype))
ops.ema_codebook_update(torch.rand(37, device=dev), rnd(37, 6), torch.rand(37, device=dev), rnd(37, 6), 0.9, 1e-5, 1.0)
lv = torch.tensor([8, 5, 5, 5])
i = torch.randint(0, 1000, (300,), generator=g).to(dev)
ops.fsq_codes_to_indices(ops.fsq_indices_to_codes(i, lv), lv)
ops.lfq_indices_to_codes(torch.randint(0, 1024, (300,), generator=g).to(dev), 10)
for N, d, exact in ((300, 8, True), (70, 13, True), (5, 16, True), (300, 24, False)):
    z = rnd(N, d)
    ops.lfq_entropy(z, 1.0, exact)
    ops.lfq_entropy_backward(torch.tensor([1.0, 0.5], device=dev), z, 1.0, exact)
# Sampling: every filter path, greedy, penalties, masks, bf16, and both verifications.
from mmfm.ops import sampling as S
for dtype in (torch.float32, torch.bfloat16):
    for B, V in ((1, 7), (3, 5000)):
        x = rnd(B, V, dtype=dtype)
        hist = torch.randint(-1, V, (B, 9), generator=g).to(dev)
        for kw in ({}, {"temperature": 0.0}, {"top_k": 5, "top_p": 0.9}, {"min_p": 0.1}, {"typical_p": 0.8}):
            S.sample(x, seed=1, history=hist, repetition_penalty=1.2, allowed_range=(0, V), **kw)
            S.processed_probs(x, allowed_mask=torch.rand(V, generator=g).to(dev) > 0.1, **kw)
    p = torch.softmax(rnd(4, 3, 300), -1)
    q = torch.softmax(rnd(4, 2, 300), -1)
    S.verify_chain(p.to(dtype), q.to(dtype), torch.randint(0, 300, (4, 2), generator=g).to(dev), seed=2)
    S.verify_multi_draft(p[:, 0].to(dtype), q[:, 0].to(dtype), torch.randint(0, 300, (4, 3), generator=g).to(dev),
                         replacement=True, seed=3)
    S.verify_multi_draft(p[:, 0].to(dtype), q[:, 0].to(dtype), torch.stack([torch.randperm(300, generator=g)[:3]
                         for _ in range(4)]).to(dev), replacement=False, seed=3)
# Key-value cache: every access width (16, 8, 4, 2 bytes), strided sources, long overlapping
# shifts, capacity filled exactly, and a rejected call (validation only).
from mmfm.ops import cache as KV
for dtype, D in ((torch.bfloat16, 64), (torch.float32, 2), (torch.float32, 1), (torch.float16, 3)):
    B, H, T = 3, 2, 700
    kv = rnd(B, H, T, D, dtype=dtype)
    KV.kv_append(kv, rnd(B, 9, H, D, dtype=dtype).transpose(1, 2), torch.tensor([0, 691, 5], device=dev),
                 torch.tensor([9, 9, 0], device=dev))
    KV.kv_insert(kv, torch.tensor([684, 3, 600], device=dev), torch.tensor([1, 3, 0], device=dev),
                 rnd(B, H, 16, D, dtype=dtype))
    KV.kv_gather_rows(kv, torch.tensor([2, 0, 0, 1], device=dev))
    try:
        KV.kv_append(kv, rnd(B, H, 2, D, dtype=dtype), T - 1)
    except ValueError:
        pass
torch.cuda.synchronize()
print("sanitizer driver done")
EOF
  for tool in memcheck racecheck; do
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # accesses past a tensor's end. Exit code 86 = errors found. Any other non-zero exit
    # (a timeout, a crash, "Device not supported") means the kernels were not checked: a
    # failure too, since a sanitizer that never finished has shown nothing.
    step "sanitizer-$tool" "$(limit 60 120)" "$OUTDIR/sanitizer_$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 86 "$PY" "$OUTDIR/sanitizer_driver.py"
    rc=$?
    if [ $rc -eq 86 ]; then
      log "sanitizer-$tool: ERRORS reported (see sanitizer_$tool.log)"
      FAILED=1
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      log "sanitizer-$tool: TIMEOUT -- counted as a failure"
      FAILED=1
    elif [ $rc -ne 0 ] || ! grep -q "sanitizer driver done" "$OUTDIR/sanitizer_$tool.log"; then
      log "sanitizer-$tool: did not run to completion (exit $rc) -- counted as a failure"
      FAILED=1
    fi
  done
fi

# ---- 5. op benchmarks on the GPU (--quick grids) -------------------------------------------
# Every op benchmark, each with --device cuda; a non-zero exit or a timeout fails the check
# (each bench refuses to time the reference under mmfm's name when the CUDA op did not run).
# Not `linear` or `attention`: the decode ops are CPU-only by design (CUDA stays on cuBLAS / SDPA,
# docs/ops_decode.md).
for b in quant sampling cache; do
  step "bench-$b" "$(limit 40 0)" "$OUTDIR/bench_${b}_cuda.log" \
    "$PY" -m mmfm.cli bench "$b" --device cuda --quick --json "$OUTDIR/bench_${b}_cuda.json"
  rc=$?
  [ $rc -ne 0 ] && FAILED=1
done

# ---- 6. training: the Trainer on the GPU (mmfm/bench/scaling.py --trainer-run) ------------
# The llama_1b shape (1.1B) in bf16, flash-attn when importable (else SDPA), concat packing into
# full 2048-token rows, ZeRO-0, 50 steps on synthetic token shards, no checkpoints; one JSON
# record each: tokens/s and MFU (medians after the warm-up window; MFU against a bf16 8192^3
# matmul measured in the same process), peak GPU memory, first/last loss. Then 2 ranks (torchrun)
# when there are two GPUs. Writes train_1gpu.{log,json}, train_2gpu.{log,json}, train_run/.
# A crash fails the check (it is the Trainer's only CUDA run); running out of time does not.
# GPU_CHECK_TRAIN_CONFIG picks another model config (e.g. m100 when 1.1B does not fit).
TRAIN_ARGS=(--trainer-run --device cuda --config "${GPU_CHECK_TRAIN_CONFIG:-llama_1b}" --precision bf16
            --seq 2048 --batch 4 --steps 50 --peak-n 8192 --samples 4000 --vocab 32768)
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
step train-1gpu "$(limit 170 0)" "$OUTDIR/train_1gpu.log" \
  "$PY" -m mmfm.bench.scaling "${TRAIN_ARGS[@]}" --out "$OUTDIR/train_run" --json "$OUTDIR/train_1gpu.json"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then FAILED=1; fi
if [ "${NGPU:-0}" -ge 2 ]; then
  step train-2gpu "$(limit 150 0)" "$OUTDIR/train_2gpu.log" \
    "$PY" -m torch.distributed.run --nproc_per_node=2 --master_port=29517 -m mmfm.bench.scaling \
    "${TRAIN_ARGS[@]}" --out "$OUTDIR/train_run" --json "$OUTDIR/train_2gpu.json"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then FAILED=1; fi
else
  log "train-2gpu: one GPU here; skipped"
fi

if [ $FAILED -ne 0 ]; then
  log "RESULT: FAILED (total $(($(date +%s) - START))s)"
  exit 1
fi
log "RESULT: ok (total $(($(date +%s) - START))s)"
exit 0
