// The CUDA sampling kernels and their launchers (csrc/sampling/sample_cuda.cu and
// verify_cuda.cu, which tests/emu_build.py compiles beside this file with their launches
// rewritten for the emulator) built against the CPU stand-in in cuda_runtime.h, behind a C
// interface for ctypes (tests/test_sampling_cuda_emulated.py). Through the launchers, every
// dtype they instantiate (fp32, bf16, fp16 logits and probabilities) runs. The tests build it
// twice: with the production block size (512 threads, sampling_cuda.cuh) and with
// -DMMFM_SAMPLING_CUDA_THREADS=64 (two warps), where small rows already span many strides of
// the block loops. Every entry point returns the launcher's cudaError_t (0 = success).
#include <vector>

#include "cuda_runtime.h"
#include "sampling/sampling_common.h"
#include "sampling/sampling_cuda.cuh"
#include "sampling/sampling_kernels.h"

using namespace mmfm;
using namespace mmfm::sampling;

namespace {

// Workspace of the launcher's size, filled with NaN so a slot the kernels read before writing
// shows up.
std::vector<float> workspace(int64_t bytes) {
  return std::vector<float>(static_cast<size_t>(bytes / 4 + 1), __int_as_float(0x7fc00000));
}

}  // namespace

extern "C" {

int emu_threads() { return cuda::kThreads; }

// The uniform a row draws with: (u0 or u1) of Philox(seed, offset, row, sub), as both kernels.
double emu_uniform(uint64_t seed, uint64_t offset, int64_t row, uint32_t sub, int second) {
  const Uniform2 u = uniforms(seed, offset, row, sub);
  return second ? u.u1 : u.u0;
}

int emu_sample(const void* logits, int dt, int64_t B, int64_t V, const float* params, const int64_t* range,
               const bool* mask, const int64_t* history, int64_t L, uint64_t seed, uint64_t offset, int write_probs,
               int64_t* tokens, float* probs, float* out, int32_t* status, const int64_t* row_offsets) {
  SampleArgs a;
  a.logits = logits;
  a.dt = static_cast<DType>(dt);
  a.B = B;
  a.V = V;
  a.params = params;
  a.allowed_range = range;
  a.allowed_mask = mask;
  a.history = history;
  a.L = L;
  a.seed = seed;
  a.offset = offset;
  a.row_offsets = row_offsets;
  std::vector<float> ws = workspace(sample_workspace_bytes(B, V));
  return write_probs ? processed_probs_cuda(a, out, status, ws.data(), nullptr)
                     : sample_cuda(a, tokens, probs, status, ws.data(), nullptr);
}

int emu_verify_chain(const void* p, const void* q, int dt, const int64_t* draft, int64_t B, int64_t G, int64_t V,
                     uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token, int32_t* status) {
  std::vector<float> ws = workspace(verify_workspace_bytes(B, V));
  const DType d = static_cast<DType>(dt);
  return verify_chain_cuda(p, d, q, d, draft, B, G, V, seed, offset, accepted, next_token, status, ws.data(), nullptr);
}

int emu_verify_multi_draft(const void* p, const void* q, int dt, int q_per_draft, const int64_t* cand, int64_t B,
                           int64_t K, int64_t V, int replacement, uint64_t seed, uint64_t offset, int64_t* token,
                           int64_t* accepted_index, int32_t* status) {
  std::vector<float> ws = workspace(verify_workspace_bytes(B, V));
  const DType d = static_cast<DType>(dt);
  return verify_multi_draft_cuda(p, d, q, d, q_per_draft != 0, cand, B, K, V, replacement != 0, seed, offset, token,
                                 accepted_index, status, ws.data(), nullptr);
}

}  // extern "C"
