// Launch helpers shared by the CUDA kernels (raw pointers, no torch headers).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mmfm {

__device__ __forceinline__ int64_t grid_stride_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Blocks for n work items at `threads` per block: at least 1, capped so grid-stride loops
// cover the rest.
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Scratch memory, stream-ordered (cudaMallocAsync / cudaFreeAsync on the op's stream).
// Where the device has no memory pools (cudaErrorNotSupported) it falls back to
// cudaMalloc / cudaFree, which synchronise but stay correct.
struct Scratch {
  void* ptr = nullptr;
  bool async = true;
  cudaError_t alloc(size_t bytes, cudaStream_t st) {
    cudaError_t e = cudaMallocAsync(&ptr, bytes, st);
    if (e == cudaErrorNotSupported) {
      (void)cudaGetLastError();  // clear it: the fallback below decides
      async = false;
      e = cudaMalloc(&ptr, bytes);
    }
    return e;
  }
  cudaError_t release(cudaStream_t st) {
    if (ptr == nullptr) return cudaSuccess;
    const cudaError_t e = async ? cudaFreeAsync(ptr, st) : cudaFree(ptr);
    ptr = nullptr;
    return e;
  }
};

}  // namespace mmfm
