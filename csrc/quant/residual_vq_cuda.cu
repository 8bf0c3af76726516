// Residual VQ on CUDA: M levels of nearest-code search on the running residual, in one
// call. Same contract as residual_vq_cpu (quant_kernels.h section 5).
//
// Algorithm: the residual lives in an fp32 scratch buffer [N, D] (r_0 = z, converted once)
// and quantized starts at 0. For each level m:
//   1. k = nearest_code_cuda(residual, codebook m) with topk = 1, which is the tiled search
//      of nearest_code_cuda.cu (never N x K; lowest index on ties). A bf16 codebook level is
//      first widened to fp32 (exact) so that the search and the update read the same values
//      as the CPU kernel, which also widens it.
//   2. one thread per row: r -= e_k, quantized += e_k, ||r||^2 summed serially over D (the
//      CPU kernel's order), and idx / residual_norm written at column m.
// Everything runs on `stream`; scratch comes from cudaMallocAsync and is freed on it.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

constexpr int kThreads = 256;

// out[i] = x[i] as fp32, for a buffer of `count` elements of type dt.
__global__ void widen_kernel(const void* x, DType dt, int64_t count, float* out) {
  for (int64_t i = grid_stride_start(); i < count; i += grid_stride_step())
    out[i] = load_as_float(x, dt, i);
}

__global__ void zero_kernel(float* x, int64_t count) {
  for (int64_t i = grid_stride_start(); i < count; i += grid_stride_step())
    x[i] = 0.f;
}

// Level m's update: one thread per row.
__global__ void update_kernel(const float* codebook, const int64_t* chosen, int64_t N, int64_t M, int64_t D,
                              int64_t m, float* residual, float* quantized, int64_t* idx, float* residual_norm) {
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) {
    const int64_t k = chosen[n];
    const float* e = codebook + k * D;
    float* r = residual + n * D;
    float* q = quantized + n * D;
    float rn = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = r[d] - e[d];
      r[d] = v;
      q[d] += e[d];
      rn = fmaf(v, v, rn);
    }
    idx[n * M + m] = k;
    residual_norm[n * M + m] = rn;
  }
}

}  // namespace

int residual_vq_cuda(const void* z, const void* codebooks, DType dt, int64_t N, int64_t M, int64_t K, int64_t D,
                     int64_t* idx, float* quantized, float* residual_norm, void* stream) {
  if (N <= 0 || M <= 0) return cudaSuccess;
  if (K <= 0 || D < 0) return cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool widen = dt != DType::F32;
  const size_t b_res = align_up(static_cast<size_t>(N * D) * sizeof(float) + sizeof(float));
  const size_t b_cb = widen ? align_up(static_cast<size_t>(K * D) * sizeof(float) + sizeof(float)) : 0;
  const size_t b_idx = align_up(static_cast<size_t>(N) * sizeof(int64_t));
  const size_t b_dist = align_up(static_cast<size_t>(N) * sizeof(float));
  Scratch scratch;
  cudaError_t err = scratch.alloc(b_res + b_cb + b_idx + b_dist, st);
  if (err != cudaSuccess) return err;
  char* buf = static_cast<char*>(scratch.ptr);
  float* residual = reinterpret_cast<float*>(buf);
  float* cb32 = widen ? reinterpret_cast<float*>(buf + b_res) : nullptr;
  int64_t* chosen = reinterpret_cast<int64_t*>(buf + b_res + b_cb);
  float* dist = reinterpret_cast<float*>(buf + b_res + b_cb + b_idx);

  widen_kernel<<<blocks_for(N * D, kThreads), kThreads, 0, st>>>(z, dt, N * D, residual);
  zero_kernel<<<blocks_for(N * D, kThreads), kThreads, 0, st>>>(quantized, N * D);
  err = cudaGetLastError();
  const size_t elem = dt == DType::F32 ? sizeof(float) : sizeof(uint16_t);
  for (int64_t m = 0; m < M && err == cudaSuccess; ++m) {
    const void* level = static_cast<const char*>(codebooks) + static_cast<size_t>(m * K * D) * elem;
    const float* level32 = static_cast<const float*>(level);
    if (widen) {
      widen_kernel<<<blocks_for(K * D, kThreads), kThreads, 0, st>>>(level, dt, K * D, cb32);
      level32 = cb32;
    }
    err = static_cast<cudaError_t>(
        nearest_code_cuda(residual, level32, DType::F32, N, K, D, 1, false, chosen, dist, stream));
    if (err != cudaSuccess) break;
    update_kernel<<<blocks_for(N, kThreads), kThreads, 0, st>>>(level32, chosen, N, M, D, m, residual, quantized, idx,
                                                               residual_norm);
    err = cudaGetLastError();
  }
  const cudaError_t ferr = scratch.release(st);
  return err != cudaSuccess ? err : ferr;
}

}  // namespace quant
}  // namespace mmfm
