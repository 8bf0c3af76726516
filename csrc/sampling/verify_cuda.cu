// Launchers of the speculative verification kernels (verify_cuda_kernel.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sampling_kernels.h"
#include "sampling/verify_cuda_kernel.cuh"

namespace mmfm {
namespace sampling {

int64_t verify_workspace_bytes(int64_t B, int64_t V) { return B * V * static_cast<int64_t>(sizeof(float)); }

int verify_chain_cuda(const void* p, DType pdt, const void* q, DType qdt, const int64_t* draft, int64_t B, int64_t G,
                      int64_t V, uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token,
                      int32_t* status, void* workspace, void* stream) {
  (void)qdt;
  (void)workspace;
  if (B == 0) return 0;
  const dim3 grid(static_cast<unsigned>(B)), block(cuda::kThreads);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (pdt) {
    case DType::BF16:
      cuda::chain_kernel<DType::BF16><<<grid, block, 0, st>>>(p, q, draft, G, V, seed, offset, accepted, next_token,
                                                             status);
      break;
    case DType::F16:
      cuda::chain_kernel<DType::F16><<<grid, block, 0, st>>>(p, q, draft, G, V, seed, offset, accepted, next_token,
                                                            status);
      break;
    default:
      cuda::chain_kernel<DType::F32><<<grid, block, 0, st>>>(p, q, draft, G, V, seed, offset, accepted, next_token,
                                                            status);
  }
  return static_cast<int>(cudaGetLastError());
}

int verify_multi_draft_cuda(const void* p, DType pdt, const void* q, DType qdt, bool q_per_draft, const int64_t* cand,
                            int64_t B, int64_t K, int64_t V, bool replacement, uint64_t seed, uint64_t offset,
                            int64_t* token, int64_t* accepted_index, int32_t* status, void* workspace, void* stream) {
  (void)qdt;
  if (B == 0) return 0;
  const dim3 grid(static_cast<unsigned>(B)), block(cuda::kThreads);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  float* ws = static_cast<float*>(workspace);
  switch (pdt) {
    case DType::BF16:
      cuda::multi_draft_kernel<DType::BF16><<<grid, block, 0, st>>>(p, q, q_per_draft, cand, K, V, replacement, seed,
                                                                   offset, ws, token, accepted_index, status);
      break;
    case DType::F16:
      cuda::multi_draft_kernel<DType::F16><<<grid, block, 0, st>>>(p, q, q_per_draft, cand, K, V, replacement, seed,
                                                                  offset, ws, token, accepted_index, status);
      break;
    default:
      cuda::multi_draft_kernel<DType::F32><<<grid, block, 0, st>>>(p, q, q_per_draft, cand, K, V, replacement, seed,
                                                                  offset, ws, token, accepted_index, status);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sampling
}  // namespace mmfm
