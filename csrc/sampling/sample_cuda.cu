// Launchers of the fused sampling kernel (sample_cuda_kernel.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sample_cuda_kernel.cuh"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace cuda {
namespace {

int launch(const SampleArgs& a, bool write_probs, int64_t* tokens, float* probs, float* out, int32_t* status,
           void* workspace, void* stream) {
  if (a.B == 0) return 0;
  const dim3 grid(static_cast<unsigned>(a.B)), block(kThreads);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  float* ws = static_cast<float*>(workspace);
  switch (a.dt) {
    case DType::BF16:
      sample_kernel<DType::BF16><<<grid, block, 0, st>>>(a, ws, write_probs, tokens, probs, out, status);
      break;
    case DType::F16:
      sample_kernel<DType::F16><<<grid, block, 0, st>>>(a, ws, write_probs, tokens, probs, out, status);
      break;
    default:
      sample_kernel<DType::F32><<<grid, block, 0, st>>>(a, ws, write_probs, tokens, probs, out, status);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace cuda

int64_t sample_workspace_bytes(int64_t B, int64_t V) { return B * V * static_cast<int64_t>(sizeof(float)); }

int sample_cuda(const SampleArgs& a, int64_t* tokens, float* probs, int32_t* status, void* workspace, void* stream) {
  return cuda::launch(a, false, tokens, probs, nullptr, status, workspace, stream);
}

int processed_probs_cuda(const SampleArgs& a, float* out, int32_t* status, void* workspace, void* stream) {
  return cuda::launch(a, true, nullptr, nullptr, out, status, workspace, stream);
}

}  // namespace sampling
}  // namespace mmfm
