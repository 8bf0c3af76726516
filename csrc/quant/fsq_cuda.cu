// Finite scalar quantization on CUDA: elementwise per row, same formulas as fsq_cpu.cpp
// (quant_kernels.h section 3).
//
// Each block first derives the per-channel constants (half_l, offset, shift, L / 2 and the
// mixed-radix weight) from `levels` (a device buffer of C <= 64 int64) into shared memory;
// then one thread per row walks its C channels, channel 0 fastest in the index.
// Numerics: setup.py compiles with --use_fast_math, which would turn tanhf into the
// hardware approximation (~1e-3 relative error near the rounding boundaries) and divisions
// into approximate ones. So tanh and atanh are evaluated in double and rounded to fp32
// (a correctly rounded fp32 value in practice), divisions use __fdiv_rn, and rounding is
// rintf (round half to even, like std::nearbyint and torch.round). Results then match the
// CPU kernel except where the bounded value lies within an ulp of a rounding boundary.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

constexpr int kMaxChannels = 64;  // product(levels) < 2^62 with each level >= 2 means C <= 61
constexpr int kThreads = 256;

struct Level {
  float half_l, offset, shift;
  int64_t L, half_width, radix;
};

// Fills lv[0, C) in shared memory; must be called by every thread of the block.
__device__ void prepare_levels(const int64_t* levels, int64_t C, Level* lv) {
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t L = levels[c];
    Level& l = lv[c];
    l.L = L;
    l.half_l = static_cast<float>(L - 1) * (1.f + 1e-3f) * 0.5f;  // x / 2 == x * 0.5 exactly
    l.offset = (L % 2 == 0) ? 0.5f : 0.f;
    l.shift = static_cast<float>(atanh(static_cast<double>(__fdiv_rn(l.offset, l.half_l))));
    l.half_width = L / 2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // prefix product: serial, C is tiny
    int64_t radix = 1;
    for (int64_t c = 0; c < C; ++c) {
      lv[c].radix = radix;
      radix *= lv[c].L;
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads)
    fsq_quantize_kernel(const void* z, DType dt, const int64_t* levels, int64_t N, int64_t C, float* codes,
                        int64_t* idx) {
  __shared__ Level lv[kMaxChannels];
  prepare_levels(levels, C, lv);
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) {
    int64_t index = 0;
    for (int64_t c = 0; c < C; ++c) {
      const Level& l = lv[c];
      const float x = load_as_float(z, dt, n * C + c) + l.shift;
      const float t = static_cast<float>(tanh(static_cast<double>(x)));
      const float q = rintf(t * l.half_l - l.offset);  // round half to even, as torch.round
      codes[n * C + c] = __fdiv_rn(q, static_cast<float>(l.half_width));
      index += (static_cast<int64_t>(q) + l.half_width) * l.radix;
    }
    idx[n] = index;
  }
}

__global__ void __launch_bounds__(kThreads)
    fsq_indices_to_codes_kernel(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes) {
  __shared__ Level lv[kMaxChannels];
  prepare_levels(levels, C, lv);
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) {
    const int64_t i = idx[n];
    for (int64_t c = 0; c < C; ++c) {
      const Level& l = lv[c];
      const int64_t digit = (i / l.radix) % l.L;
      codes[n * C + c] = __fdiv_rn(static_cast<float>(digit - l.half_width), static_cast<float>(l.half_width));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    fsq_codes_to_indices_kernel(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx) {
  __shared__ Level lv[kMaxChannels];
  prepare_levels(levels, C, lv);
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) {
    int64_t index = 0;
    for (int64_t c = 0; c < C; ++c) {
      const Level& l = lv[c];
      // Off-grid codes snap to the nearest level, and past the ends to the edge. The clamp
      // happens in double before the int64 conversion so huge inputs stay well defined.
      double r = rint(static_cast<double>(codes[n * C + c] * static_cast<float>(l.half_width)));
      const double lo = -static_cast<double>(l.half_width), hi = static_cast<double>(l.L - 1 - l.half_width);
      r = r < lo ? lo : (r > hi ? hi : r);
      int64_t digit = static_cast<int64_t>(r) + l.half_width;
      digit = digit < 0 ? 0 : (digit > l.L - 1 ? l.L - 1 : digit);
      index += digit * l.radix;
    }
    idx[n] = index;
  }
}

// Launches one of the per-row kernels above after the checks they share (C bounds the
// shared-memory level table).
template <class... Params, class... Args>
int launch_rows(void (*kernel)(Params...), int64_t N, int64_t C, void* stream, Args... args) {
  if (N <= 0) return cudaSuccess;
  if (C < 1 || C > kMaxChannels) return cudaErrorInvalidValue;
  kernel<<<blocks_for(N, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args...);
  return cudaGetLastError();
}

}  // namespace

int fsq_quantize_cuda(const void* z, DType dt, const int64_t* levels, int64_t N, int64_t C, float* codes,
                      int64_t* idx, void* stream) {
  return launch_rows(fsq_quantize_kernel, N, C, stream, z, dt, levels, N, C, codes, idx);
}

int fsq_indices_to_codes_cuda(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes,
                              void* stream) {
  return launch_rows(fsq_indices_to_codes_kernel, N, C, stream, idx, levels, N, C, codes);
}

int fsq_codes_to_indices_cuda(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx,
                              void* stream) {
  return launch_rows(fsq_codes_to_indices_kernel, N, C, stream, codes, levels, N, C, idx);
}

}  // namespace quant
}  // namespace mmfm
