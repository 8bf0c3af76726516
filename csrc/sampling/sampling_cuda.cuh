// Block-level building blocks of the CUDA sampling kernels (one thread block per row):
// deterministic reductions and scans, the weighted threshold selection by bisection and the
// inverse-CDF draw. Raw pointers only; included by sample_cuda.cu and verify_cuda.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sampling_common.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace cuda {

#ifndef MMFM_SAMPLING_CUDA_THREADS
#define MMFM_SAMPLING_CUDA_THREADS 512  // tests/cuda_emu builds with fewer, to run faster
#endif
constexpr int kThreads = MMFM_SAMPLING_CUDA_THREADS;  // threads per block (one block per row)
constexpr int kWarps = kThreads / 32;
constexpr int kCutPivots = 15;             // pivots per bisection pass (p[1..15]; p[0] = lower end)
constexpr int kGather = 1024;              // a selection ends by sorting at most this many candidates

// ---- reductions (fixed order: results do not depend on timing) -------------------------
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ long long warp_sum_ll(long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Reduce {
  double d[kWarps][2 * (kCutPivots + 1)];
  float f[kWarps][4];
  long long l[kWarps][2];
};

// Sums N doubles over the block; every thread gets the totals.
template <int N>
__device__ void block_sum(double (&v)[N], Reduce& sh) {
  static_assert(N <= 2 * (kCutPivots + 1), "block_sum: too many values");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) sh.d[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sh.d[w][k];
    v[k] = s;
  }
  __syncthreads();
}

// Block max / min of floats and sums of two counters; every thread gets the results.
__device__ void block_stats(float& mx, float& mn, long long& c0, long long& c1, Reduce& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  mx = warp_max(mx);
  mn = warp_min(mn);
  c0 = warp_sum_ll(c0);
  c1 = warp_sum_ll(c1);
  if (lane == 0) {
    sh.f[warp][0] = mx;
    sh.f[warp][1] = mn;
    sh.l[warp][0] = c0;
    sh.l[warp][1] = c1;
  }
  __syncthreads();
  mx = -kInf;
  mn = kInf;
  c0 = 0;
  c1 = 0;
  for (int w = 0; w < kWarps; ++w) {
    mx = fmaxf(mx, sh.f[w][0]);
    mn = fminf(mn, sh.f[w][1]);
    c0 += sh.l[w][0];
    c1 += sh.l[w][1];
  }
  __syncthreads();
}

// Exclusive prefix sum of one double per thread in thread order; returns the prefix, and the
// block total in `total`.
__device__ double block_exclusive_scan(double v, double& total, Reduce& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) sh.d[warp][0] = inc;
  __syncthreads();
  double before = 0.0;
  total = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += sh.d[w][0];
    total += sh.d[w][0];
  }
  __syncthreads();
  return before + inc - v;
}

// ---- ordered float codes -----------------------------------------------------------------------
__device__ __forceinline__ uint32_t float_code(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float code_float(uint32_t c) {
  return __uint_as_float((c & 0x80000000u) ? (c & 0x7fffffffu) : ~c);
}

// ---- weighted selection ---------------------------------------------------------------------------
struct SelectShared {
  float key[kGather];
  float w[kGather];
  int count;
  float result;
  Reduce red;
};

// The largest key value v over the tokens of the row that `src` accepts such that the weight
// of {key >= v} reaches `target` (target_is_fraction: frac * total weight). src(i, key, w)
// returns false for tokens that do not take part. Bisection on the ordered float codes of the
// keys with kCutPivots pivots per pass (each pass narrows the code range 16-fold), then the at
// most kGather tokens of the bracketing interval are sorted in shared memory.
// kmin must be <= every key, kmax >= every key. Every thread must call it; all get the result.
template <class Src>
__device__ float block_select(const Src& src, int64_t V, double target, bool target_is_fraction, float kmin,
                              float kmax, SelectShared& sh) {
  if ((__float_as_uint(kmax) & 0x7fffffffu) == 0u) kmax = 0.f;  // -0 -> +0: keys equal to 0 stay below hi
  uint32_t lo = float_code(kmin);
  uint32_t hi = float_code(kmax) + 1u;  // exclusive; kmax is finite so this does not wrap
  bool hi_open = true;                  // the first interval is [kmin, +inf)
  double m_hi = 0.0;                    // weight of the keys above the interval
  long long count = 0;
  bool first = true;
  for (int pass = 0; pass < 64; ++pass) {
    float p[kCutPivots + 1];
    const uint64_t span = static_cast<uint64_t>(hi - lo);
    p[0] = code_float(lo);
#pragma unroll
    for (int j = 1; j <= kCutPivots; ++j)
      p[j] = code_float(lo + static_cast<uint32_t>(span * static_cast<uint64_t>(j) / (kCutPivots + 1)));
    const float hif = code_float(hi);
    // Per-thread partial sums in fp32 (a thread sees V / kThreads tokens; counts are exact
    // below 2^24), block totals in fp64.
    float part[2 * (kCutPivots + 1)];
#pragma unroll
    for (int j = 0; j < 2 * (kCutPivots + 1); ++j) part[j] = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      float k, w;
      if (!src(i, k, w)) continue;
      if (!(k >= p[0]) || (!hi_open && !(k < hif))) continue;
#pragma unroll
      for (int j = 0; j <= kCutPivots; ++j) {
        if (k >= p[j]) {
          part[j] += w;
          part[kCutPivots + 1 + j] += 1.f;
        }
      }
    }
    double acc[2 * (kCutPivots + 1)];
#pragma unroll
    for (int j = 0; j < 2 * (kCutPivots + 1); ++j) acc[j] = part[j];
    block_sum(acc, sh.red);
    if (first) {
      if (target_is_fraction) target *= acc[0];
      target = fmax(target, 4.9406564584124654e-324);  // frac == 0: the largest key of positive weight
      first = false;
    }
    int J = 0;
#pragma unroll
    for (int j = 1; j <= kCutPivots; ++j)
      if (m_hi + acc[j] >= target) J = j;
    const uint32_t nlo = J == 0 ? lo : lo + static_cast<uint32_t>(span * static_cast<uint64_t>(J) / (kCutPivots + 1));
    if (J < kCutPivots) {
      hi = lo + static_cast<uint32_t>(span * static_cast<uint64_t>(J + 1) / (kCutPivots + 1));
      hi_open = false;
      m_hi += acc[J + 1];
      count = static_cast<long long>(acc[kCutPivots + 1 + J] - acc[kCutPivots + 2 + J]);
    } else {
      count = static_cast<long long>(acc[2 * kCutPivots + 1]);
    }
    lo = nlo;
    if (count <= kGather || hi - lo <= 1u) break;
  }
  if (count == 0 || hi - lo <= 1u) return code_float(lo);  // a single value left (or rounding)
  // Gather the interval's tokens, sort them by key (then weight) descending, accumulate.
  const float lof = code_float(lo), hif = code_float(hi);
  if (threadIdx.x == 0) sh.count = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    float k, w;
    if (!src(i, k, w)) continue;
    if (!(k >= lof) || (!hi_open && !(k < hif))) continue;
    const int slot = atomicAdd(&sh.count, 1);
    if (slot < kGather) {
      sh.key[slot] = k;
      sh.w[slot] = w;
    }
  }
  __syncthreads();
  const int n = min(sh.count, kGather);
  int n2 = 1;
  while (n2 < n) n2 <<= 1;
  for (int i = n + threadIdx.x; i < n2; i += kThreads) {
    sh.key[i] = -kInf;
    sh.w[i] = -1.f;
  }
  __syncthreads();
  for (int size = 2; size <= n2; size <<= 1) {  // bitonic sort, descending by (key, w)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n2; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const float ki = sh.key[i], kj = sh.key[j], wi = sh.w[i], wj = sh.w[j];
          const bool i_first = ki > kj || (ki == kj && wi >= wj);
          if (i_first != desc) {
            sh.key[i] = kj;
            sh.key[j] = ki;
            sh.w[i] = wj;
            sh.w[j] = wi;
          }
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    double a = m_hi;
    float res = n > 0 ? sh.key[n - 1] : lof;
    for (int i = 0; i < n; ++i) {
      a += sh.w[i];
      if (a >= target) {
        res = sh.key[i];
        break;
      }
    }
    sh.result = res;
  }
  __syncthreads();
  const float r = sh.result;
  __syncthreads();
  return r;
}

// ---- inverse-CDF draw -----------------------------------------------------------------------------
struct DrawShared {
  Reduce red;
  unsigned long long pick;
};

// Draws i with probability w(i) / sum w by inverse CDF in index order: thread t owns the
// contiguous chunk [t C, (t+1) C), chunk sums are scanned in thread order, the owner of the
// target scans its chunk. Returns -1 when the weights have no positive mass; `Z` gets the sum.
template <class WFn>
__device__ int64_t block_draw(const WFn& wfn, int64_t V, double u, DrawShared& sh, double& Z) {
  const int64_t C = (V + kThreads - 1) / kThreads;
  const int64_t b = static_cast<int64_t>(threadIdx.x) * C, e = b + C < V ? b + C : V;
  double own = 0.0;
  for (int64_t i = b; i < e; ++i) own += wfn(i);
  double total;
  const double before = block_exclusive_scan(own, total, sh.red);
  Z = total;
  if (!(total > 0.0)) return -1;
  if (threadIdx.x == 0) sh.pick = ~0ull;
  __syncthreads();
  // The owner of the target: prefix <= target < prefix + own. Scan rounding can make two
  // neighbours claim it (the lower index wins) or none (handled below).
  const double target = u * total;
  if (own > 0.0 && before <= target && target < before + own) {
    double a = before;
    int64_t pick = -1, last = -1;
    for (int64_t i = b; i < e; ++i) {
      const float w = wfn(i);
      if (w > 0.f) {
        last = i;
        a += w;
        if (a > target) {
          pick = i;
          break;
        }
      }
    }
    atomicMin(&sh.pick, static_cast<unsigned long long>(pick >= 0 ? pick : last));
  }
  __syncthreads();
  if (threadIdx.x == 0 && sh.pick == ~0ull) {
    // Rounding put the target past every chunk: the last token of positive weight.
    for (int64_t i = V - 1; i >= 0; --i) {
      if (wfn(i) > 0.f) {
        sh.pick = static_cast<unsigned long long>(i);
        break;
      }
    }
  }
  __syncthreads();
  const int64_t r = static_cast<int64_t>(sh.pick);
  __syncthreads();
  return r;
}

}  // namespace cuda
}  // namespace sampling
}  // namespace mmfm
