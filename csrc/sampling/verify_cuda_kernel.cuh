// Kernels of lossless speculative verification on CUDA (contract in sampling_kernels.h): one
// thread block per row. The acceptance tests are sequential and cheap (thread 0); residual
// distributions and draws are block-wide passes with the same Philox stream and the same
// inverse-CDF order as the CPU kernels (verify_cpu.cpp). Launched by verify_cuda.cu; kept in a
// header so that tests/cuda_emu can run them on the CPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sampling_common.h"
#include "sampling/sampling_cuda.cuh"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace cuda {

template <DType D>
__device__ __forceinline__ const void* row_ptr(const void* base, int64_t row, int64_t V) {
  return static_cast<const char*>(base) + row * V * static_cast<int64_t>(D == DType::F32 ? 4 : 2);
}

template <DType D>
struct PosWeight {  // max(0, p)
  const void* p;
  __device__ float operator()(int64_t i) const { return fmaxf(load<D>(p, i), 0.f); }
};
template <DType D>
struct ResidualWeight {  // max(0, p - q)
  const void* p;
  const void* q;
  __device__ float operator()(int64_t i) const { return fmaxf(load<D>(p, i) - load<D>(q, i), 0.f); }
};
struct BufferWeight {
  const float* r;
  __device__ float operator()(int64_t i) const { return r[i]; }
};

// Sum of a per-thread count over the block; every thread gets the total.
__device__ __forceinline__ long long block_count(long long c, Reduce& red) {
  float a = 0.f, b = 0.f;
  long long unused = 0;
  block_stats(a, b, c, unused, red);
  return c;
}

// Number of invalid (NaN, inf, negative) entries of up to two typed rows, block-wide.
template <DType D>
__device__ long long count_invalid(const void* p, const void* q, int64_t V, Reduce& red) {
  long long bad = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    bad += !valid_prob(load<D>(p, i));
    if (q) bad += !valid_prob(load<D>(q, i));
  }
  return block_count(bad, red);
}

struct VShared {
  DrawShared draw;
  int32_t status;
  int64_t j;
  int accept;
  float qx_raw;
  double scale;
};

template <DType D>
__global__ void __launch_bounds__(kThreads)
    chain_kernel(const void* p, const void* q, const int64_t* draft, int64_t G, int64_t V, uint64_t seed,
                 uint64_t offset, int64_t* accepted, int64_t* next_token, int32_t* status) {
  __shared__ VShared sh;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) {
    int32_t st = kOk;
    int64_t j = 0;
    for (int64_t l = 0; l < G; ++l)
      if (draft[b * G + l] < 0 || draft[b * G + l] >= V) st = kBadDraft;
    for (; st == kOk && j < G; ++j) {
      const int64_t x = draft[b * G + j];
      const float px = load<D>(row_ptr<D>(p, b * (G + 1) + j, V), x);
      const float qx = load<D>(row_ptr<D>(q, b * G + j, V), x);
      if (!valid_prob(px) || !valid_prob(qx)) {
        st = kBadLogits;
        break;
      }
      const double u0 = uniforms(seed, offset, b, static_cast<uint32_t>(j)).u0;
      if (!(u0 * static_cast<double>(qx) < static_cast<double>(px))) break;  // rejected at j
    }
    sh.status = st;
    sh.j = j;
  }
  __syncthreads();
  const int32_t st0 = sh.status;
  const int64_t j = sh.j;
  __syncthreads();
  auto finish = [&](int32_t st, int64_t acc, int64_t tok) {
    if (threadIdx.x == 0) {
      status[b] = st;
      accepted[b] = acc;
      next_token[b] = tok;
    }
  };
  if (st0 != kOk) {
    finish(st0, 0, -1);
    return;
  }
  int64_t tok;
  double Z;
  int32_t st = kOk;
  if (j < G) {
    const void* pj = row_ptr<D>(p, b * (G + 1) + j, V);
    const void* qj = row_ptr<D>(q, b * G + j, V);
    if (count_invalid<D>(pj, qj, V, sh.draw.red) != 0) {
      st = kBadLogits;
      tok = -1;
    } else {
      const double u1 = uniforms(seed, offset, b, static_cast<uint32_t>(j)).u1;
      tok = block_draw(ResidualWeight<D>{pj, qj}, V, u1, sh.draw, Z);
      if (tok < 0) tok = block_draw(PosWeight<D>{pj}, V, u1, sh.draw, Z);  // p_j == q_j: rounding
      if (tok < 0) st = kBadProbs;
    }
  } else {
    const void* pg = row_ptr<D>(p, b * (G + 1) + G, V);
    if (count_invalid<D>(pg, nullptr, V, sh.draw.red) != 0) {
      st = kBadLogits;
      tok = -1;
    } else {
      tok = block_draw(PosWeight<D>{pg}, V, uniforms(seed, offset, b, static_cast<uint32_t>(G)).u0, sh.draw, Z);
      if (tok < 0) st = kBadProbs;
    }
  }
  finish(st, j, tok);
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    multi_draft_kernel(const void* p, const void* q, bool q_per_draft, const int64_t* cand, int64_t K, int64_t V,
                       bool replacement, uint64_t seed, uint64_t offset, float* __restrict ws, int64_t* token,
                       int64_t* accepted_index, int32_t* status) {
  __shared__ VShared sh;
  const int64_t b = blockIdx.x;
  const int64_t* c = cand + b * K;
  float* __restrict r = ws + b * V;
  if (threadIdx.x == 0) {
    int32_t st = kOk;
    for (int64_t i = 0; i < K && st == kOk; ++i) {
      if (c[i] < 0 || c[i] >= V) st = kBadDraft;
      for (int64_t l = 0; l < i && !replacement && st == kOk; ++l)
        if (c[l] == c[i]) st = kDuplicateDraft;
    }
    sh.status = st;
  }
  __syncthreads();
  auto finish = [&](int32_t st, int64_t tok, int64_t idx) {
    if (threadIdx.x == 0) {
      status[b] = st;
      token[b] = tok;
      accepted_index[b] = idx;
    }
  };
  if (sh.status != kOk) {
    finish(sh.status, -1, -1);
    return;
  }
  const void* pb = row_ptr<D>(p, b, V);
  // r = max(0, p), R = sum r.
  long long bad = 0;
  double R[1] = {0.0};
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = load<D>(pb, i);
    bad += !valid_prob(x);
    r[i] = fmaxf(x, 0.f);
    R[0] += r[i];
  }
  bad = block_count(bad, sh.draw.red);
  block_sum(R, sh.draw.red);
  if (bad) {
    finish(kBadLogits, -1, -1);
    return;
  }
  double removed = 0.0;  // q-mass of the candidates drawn before (without replacement)
  for (int64_t i = 0; i < K && R[0] > 0.0; ++i) {
    const int64_t x = c[i];
    const void* qi = row_ptr<D>(q, q_per_draft ? b * K + i : b, V);
    if (!replacement && !(1.0 - removed > 0.0)) break;  // q has no mass left for another draft
    const double scale = replacement ? 1.0 : 1.0 / (1.0 - removed);
    if (threadIdx.x == 0) {
      const float qx_raw = load<D>(qi, x);
      int acc = 0;
      if (valid_prob(qx_raw)) {
        const double u0 = uniforms(seed, offset, b, static_cast<uint32_t>(i)).u0;
        acc = u0 * (static_cast<double>(qx_raw) * scale) * R[0] < static_cast<double>(r[x]) ? 1 : 0;
      } else {
        acc = -1;
      }
      sh.accept = acc;
      sh.qx_raw = qx_raw;
    }
    __syncthreads();
    const int acc = sh.accept;
    const float qx_raw = sh.qx_raw;
    __syncthreads();
    if (acc < 0) {
      finish(kBadLogits, -1, -1);
      return;
    }
    if (acc == 1) {
      finish(kOk, x, i);
      return;
    }
    // r <- max(0, r - R q_i); q_i is 0 at the candidates removed before this one.
    const float f = static_cast<float>(R[0] * scale);
    long long badq = 0;
    double R2[1] = {0.0};
    for (int64_t y = threadIdx.x; y < V; y += kThreads) {
      const float qy = load<D>(qi, y);
      badq += !valid_prob(qy);
      bool gone = false;
      for (int64_t l = 0; l < i && !replacement; ++l) gone = gone || c[l] == y;
      if (!gone) r[y] = fmaxf(r[y] - f * qy, 0.f);
      R2[0] += r[y];
    }
    badq = block_count(badq, sh.draw.red);
    block_sum(R2, sh.draw.red);
    if (badq) {
      finish(kBadLogits, -1, -1);
      return;
    }
    R[0] = R2[0];
    if (!replacement) removed += static_cast<double>(qx_raw);
  }
  // Every candidate rejected: draw from the residual (from p if rounding left it empty).
  const double u = uniforms(seed, offset, b, static_cast<uint32_t>(K)).u0;
  double Z;
  int64_t tok = block_draw(BufferWeight{r}, V, u, sh.draw, Z);
  if (tok < 0) tok = block_draw(PosWeight<D>{pb}, V, u, sh.draw, Z);
  finish(tok >= 0 ? kOk : kBadProbs, tok, -1);
}

}  // namespace cuda
}  // namespace sampling
}  // namespace mmfm
