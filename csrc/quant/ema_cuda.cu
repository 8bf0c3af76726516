// EMA codebook statistics on CUDA, deterministic (bit-identical from run to run).
//
// code_stats (same contract as code_stats_cpu, quant_kernels.h section 2):
//   1. keys = idx, values = row ids 0..N-1; CUB's radix sort by key is stable, so each
//      code's rows come out in increasing row order (the CPU kernel's counting sort gives the
//      same order). Only the low ceil(log2 K) key bits are sorted.
//   2. Segment bounds: a thread per sorted position marks where its code's run starts and
//      ends (no atomics: each bound is written by exactly one position).
//   3. One thread per (code, d) sums its code's rows serially in row order with fp32 adds,
//      exactly the CPU kernel's order, so the sums match it bit for bit (up to denormals,
//      which --use_fast_math flushes). counts = run length, an exact integer.
//   Nothing depends on scheduling: no float atomics, no block-count dependent reduction.
//   A code that collects most rows is summed by D threads serially (O(N) each): that is the
//   price of the fixed row order the contract asks for.
//
// ema_update (section 2): new_size and dead per code, and n = sum(new_size) as a double
// reduction in one block with a fixed assignment of codes to threads and a fixed tree, so
// n is deterministic; then one thread per (code, d) element for new_sum and the codebook.
// Divisions use __fdiv_rn so --use_fast_math does not turn them into approximations.
#include <cuda_runtime.h>
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

__global__ void iota_kernel(int64_t* out, int64_t n) {
  for (int64_t i = grid_stride_start(); i < n; i += grid_stride_step()) out[i] = i;
}

// begin[k], end[k]: the run of code k in the sorted keys (both 0 for an absent code).
__global__ void segment_bounds_kernel(const uint64_t* keys, int64_t n, int64_t* begin, int64_t* end) {
  for (int64_t i = grid_stride_start(); i < n; i += grid_stride_step()) {
    const uint64_t k = keys[i];
    if (i == 0 || keys[i - 1] != k) begin[k] = i;
    if (i == n - 1 || keys[i + 1] != k) end[k] = i + 1;
  }
}

__global__ void segment_sums_kernel(const void* z, DType dt, const int64_t* rows, const int64_t* begin,
                                    const int64_t* end, int64_t K, int64_t D, float* sums) {
  for (int64_t e = grid_stride_start(); e < K * D; e += grid_stride_step()) {
    const int64_t k = e / D, d = e % D;
    float s = 0.f;
    for (int64_t i = begin[k]; i < end[k]; ++i) s += load_as_float(z, dt, rows[i] * D + d);
    sums[e] = s;
  }
}

__global__ void segment_counts_kernel(const int64_t* begin, const int64_t* end, int64_t K, float* counts) {
  for (int64_t k = grid_stride_start(); k < K; k += grid_stride_step())
    counts[k] = static_cast<float>(end[k] - begin[k]);
}

constexpr int kReduceThreads = 1024;

// One block: new_size, dead, and n = sum(new_size) (double, fixed order) into *total.
__global__ void __launch_bounds__(kReduceThreads)
    ema_sizes_kernel(const float* size, const float* counts, int64_t K, float decay, float dead_threshold,
                     float* new_size, bool* dead, float* total) {
  __shared__ double part[kReduceThreads];
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += kReduceThreads) {
    const float ns = decay * size[k] + (1.f - decay) * counts[k];
    new_size[k] = ns;
    dead[k] = ns < dead_threshold;
    acc += ns;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = static_cast<float>(part[0]);
}

__global__ void ema_codebook_kernel(const float* embed_sum, const float* sums, const float* new_size,
                                    const float* total, int64_t K, int64_t D, float decay, float eps, float* new_sum,
                                    float* codebook) {
  const float n = *total;
  const float denom = n + static_cast<float>(K) * eps;
  for (int64_t e = grid_stride_start(); e < K * D; e += grid_stride_step()) {
    const int64_t k = e / D;
    const float smoothed = __fdiv_rn(new_size[k] + eps, denom) * n;
    const float v = decay * embed_sum[e] + (1.f - decay) * sums[e];
    new_sum[e] = v;
    codebook[e] = __fdiv_rn(v, smoothed);
  }
}

}  // namespace

int code_stats_cuda(const void* z, DType dt, const int64_t* idx, int64_t N, int64_t K, int64_t D, float* sums,
                    float* counts, void* stream) {
  if (K <= 0 || D < 0 || N < 0) return cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (N == 0) {  // no rows: every sum and count is 0
    err = cudaMemsetAsync(sums, 0, static_cast<size_t>(K * D) * sizeof(float), st);
    if (err == cudaSuccess) err = cudaMemsetAsync(counts, 0, static_cast<size_t>(K) * sizeof(float), st);
    return err;
  }

  // Sort on the bits that can be set: indices are in [0, K).
  int end_bit = 1;
  while (end_bit < 63 && (int64_t(1) << end_bit) < K) ++end_bit;
  const uint64_t* keys_in = reinterpret_cast<const uint64_t*>(idx);  // non-negative: same order

  size_t sort_bytes = 0;
  err = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, static_cast<uint64_t*>(nullptr),
                                        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), N, 0,
                                        end_bit, st);
  if (err != cudaSuccess) return err;

  const size_t b_n = align_up(static_cast<size_t>(N) * 8), b_k = align_up(static_cast<size_t>(K) * 8);
  const size_t b_sort = align_up(sort_bytes);
  Scratch scratch;
  err = scratch.alloc(3 * b_n + 2 * b_k + b_sort, st);
  if (err != cudaSuccess) return err;
  char* buf = static_cast<char*>(scratch.ptr);
  uint64_t* keys_out = reinterpret_cast<uint64_t*>(buf);
  int64_t* rows_in = reinterpret_cast<int64_t*>(buf + b_n);
  int64_t* rows_out = reinterpret_cast<int64_t*>(buf + 2 * b_n);
  int64_t* begin = reinterpret_cast<int64_t*>(buf + 3 * b_n);
  int64_t* end = reinterpret_cast<int64_t*>(buf + 3 * b_n + b_k);
  void* sort_tmp = buf + 3 * b_n + 2 * b_k;

  iota_kernel<<<blocks_for(N, 256), 256, 0, st>>>(rows_in, N);
  err = cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys_out, rows_in, rows_out, N, 0, end_bit,
                                        st);
  if (err == cudaSuccess) err = cudaMemsetAsync(begin, 0, 2 * b_k, st);  // begin and end are adjacent
  if (err == cudaSuccess) {
    segment_bounds_kernel<<<blocks_for(N, 256), 256, 0, st>>>(keys_out, N, begin, end);
    if (K * D > 0)
      segment_sums_kernel<<<blocks_for(K * D, 256), 256, 0, st>>>(z, dt, rows_out, begin, end, K, D, sums);
    segment_counts_kernel<<<blocks_for(K, 256), 256, 0, st>>>(begin, end, K, counts);
    err = cudaGetLastError();
  }
  const cudaError_t ferr = scratch.release(st);
  return err != cudaSuccess ? err : ferr;
}

int ema_update_cuda(const float* size, const float* embed_sum, const float* counts, const float* sums, int64_t K,
                    int64_t D, float decay, float eps, float dead_threshold, float* new_size, float* new_sum,
                    float* codebook, bool* dead, void* stream) {
  if (K <= 0 || D < 0) return cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  Scratch scratch;
  cudaError_t err = scratch.alloc(sizeof(float), st);
  if (err != cudaSuccess) return err;
  float* total = static_cast<float*>(scratch.ptr);
  ema_sizes_kernel<<<1, kReduceThreads, 0, st>>>(size, counts, K, decay, dead_threshold, new_size, dead, total);
  if (K * D > 0)
    ema_codebook_kernel<<<blocks_for(K * D, 256), 256, 0, st>>>(embed_sum, sums, new_size, total, K, D, decay, eps,
                                                               new_sum, codebook);
  err = cudaGetLastError();
  const cudaError_t ferr = scratch.release(st);
  return err != cudaSuccess ? err : ferr;
}

}  // namespace quant
}  // namespace mmfm
