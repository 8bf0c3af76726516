// The CUDA sampling kernels (csrc/sampling/*_kernel.cuh) built against the CPU stand-in in
// cuda_runtime.h, behind a C interface for ctypes (tests/test_sampling_cuda_emulated.py).
// Blocks have 64 threads (two warps) instead of 512 so the emulation runs quickly; the code
// paths are the same.
#define MMFM_SAMPLING_CUDA_THREADS 64
#include "cuda_runtime.h"
#include "sampling/sample_cuda_kernel.cuh"
#include "sampling/verify_cuda_kernel.cuh"

#include <vector>

using namespace mmfm;
using namespace mmfm::sampling;

extern "C" {

int emu_threads() { return cuda::kThreads; }

void emu_sample(const void* logits, int dt, int64_t B, int64_t V, const float* params, const int64_t* range,
                const bool* mask, const int64_t* history, int64_t L, uint64_t seed, uint64_t offset, int write_probs,
                int64_t* tokens, float* probs, float* out, int32_t* status) {
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
  std::vector<float> ws(static_cast<size_t>(B * V));
  float* w = ws.data();
  const bool wp = write_probs != 0;
  emu::launch(dim3(static_cast<unsigned>(B)), dim3(cuda::kThreads), [&] {
    switch (a.dt) {
      case DType::BF16:
        cuda::sample_kernel<DType::BF16>(a, w, wp, tokens, probs, out, status);
        break;
      case DType::F16:
        cuda::sample_kernel<DType::F16>(a, w, wp, tokens, probs, out, status);
        break;
      default:
        cuda::sample_kernel<DType::F32>(a, w, wp, tokens, probs, out, status);
    }
  });
}

void emu_verify_chain(const float* p, const float* q, const int64_t* draft, int64_t B, int64_t G, int64_t V,
                      uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token, int32_t* status) {
  emu::launch(dim3(static_cast<unsigned>(B)), dim3(cuda::kThreads), [&] {
    cuda::chain_kernel<DType::F32>(p, q, draft, G, V, seed, offset, accepted, next_token, status);
  });
}

void emu_verify_multi_draft(const float* p, const float* q, int q_per_draft, const int64_t* cand, int64_t B, int64_t K,
                            int64_t V, int replacement, uint64_t seed, uint64_t offset, int64_t* token,
                            int64_t* accepted_index, int32_t* status) {
  std::vector<float> ws(static_cast<size_t>(B * V));
  float* w = ws.data();
  emu::launch(dim3(static_cast<unsigned>(B)), dim3(cuda::kThreads), [&] {
    cuda::multi_draft_kernel<DType::F32>(p, q, q_per_draft != 0, cand, K, V, replacement != 0, seed, offset, w, token,
                                         accepted_index, status);
  });
}

}  // extern "C"
