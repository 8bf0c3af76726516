// Kernel of fused logits processing and sampling on CUDA (contract in sampling_kernels.h):
// one thread block per row, the processed logits of the row in a global workspace [B, V]
// (L2-resident for the usual sizes). Same processing order, thresholds and Philox stream as
// the CPU kernel (sample_cpu.cpp); top-k, top-p and typical thresholds come from
// block_select (bisection on the ordered float codes, then a sort of <= 1024 candidates in
// shared memory), so no step sorts the vocabulary. Reductions have a fixed order: results are
// deterministic. Launched by sample_cuda.cu; kept in a header so that
// tests/cuda_emu can run it on the CPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sampling_common.h"
#include "sampling/sampling_cuda.cuh"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace cuda {

constexpr float kLowestF = -3.40282346638528859812e+38f;

// Token sources for block_select.
struct SrcCount {  // top-k: every finite token, unit weight
  const float* s;
  __device__ bool operator()(int64_t i, float& k, float& w) const {
    k = s[i];
    w = 1.f;
    return k >= kLowestF;
  }
};
struct SrcTopP {
  const float* s;
  float theta, m;
  __device__ bool operator()(int64_t i, float& k, float& w) const {
    k = s[i];
    if (!(k >= theta)) return false;
    w = exp_weight(k - m);
    return true;
  }
};
struct SrcTypical {
  const float* s;
  float theta, m, mu;
  __device__ bool operator()(int64_t i, float& k, float& w) const {
    const float x = s[i];
    if (!(x >= theta)) return false;
    k = -fabsf(x - mu);
    w = exp_weight(x - m);
    return true;
  }
};
struct KeptWeight {
  const float* s;
  float theta, m, mu, tkey;
  __device__ float operator()(int64_t i) const {
    const float x = s[i];
    return (x >= theta && -fabsf(x - mu) >= tkey) ? exp_weight(x - m) : 0.f;
  }
};

struct Shared {
  SelectShared sel;
  DrawShared draw;
  unsigned long long argmax;
};

template <DType D>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(SampleArgs a, float* __restrict ws, bool write_probs, int64_t* __restrict tokens,
                  float* __restrict probs, float* __restrict out, int32_t* __restrict status) {
  __shared__ Shared sh;
  const int64_t row = blockIdx.x, V = a.V;
  const float* prm = a.params + row * kNumParams;
  float* __restrict s = ws + row * V;
  float* o = write_probs ? out + row * V : nullptr;

  auto finish_bad = [&](int32_t st) {
    if (threadIdx.x == 0) {
      status[row] = st;
      if (!write_probs) {
        tokens[row] = -1;
        probs[row] = 0.f;
      }
    }
    if (write_probs)
      for (int64_t i = threadIdx.x; i < V; i += kThreads) o[i] = 0.f;
  };

  int32_t st = check_params(prm);
  int64_t lo = 0, hi = V;
  if (st == kOk && a.allowed_range) {
    lo = a.allowed_range[2 * row];
    hi = a.allowed_range[2 * row + 1];
    if (!(lo >= 0 && lo < hi && hi <= V)) st = kBadRange;
  }
  if (st != kOk) {
    finish_bad(st);
    return;
  }

  // 1. load, allowed tokens; 2. penalties.
  const void* x = static_cast<const char*>(a.logits) + row * V * static_cast<int64_t>(D == DType::F32 ? 4 : 2);
  const bool* mk = a.allowed_mask ? a.allowed_mask + row * V : nullptr;
  long long bad = 0, bad_hist = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float z = load<D>(x, i);
    bad += !(z < kInf);
    const bool ok = i >= lo && i < hi && (mk == nullptr || mk[i]);
    s[i] = ok ? z : -kInf;
  }
  __syncthreads();
  if (a.history) {
    const int64_t* h = a.history + row * a.L;
    const bool active = has_penalty(prm);
    for (int64_t j = threadIdx.x; j < a.L; j += kThreads) {
      const int64_t t = h[j];
      if (t < 0) continue;
      if (t >= V) {
        ++bad_hist;
        continue;
      }
      if (!active) continue;
      bool first = true;
      for (int64_t j2 = 0; j2 < j && first; ++j2) first = h[j2] != t;
      if (!first) continue;  // the first occurrence applies the penalty for all of them
      int64_t count = 0;
      for (int64_t j2 = j; j2 < a.L; ++j2) count += h[j2] == t;
      const float z = s[t];
      if (z > -kInf) s[t] = apply_penalty(z, count, prm[kRepetitionPenalty], prm[kPresencePenalty],
                                           prm[kFrequencyPenalty]);
    }
  }
  __syncthreads();

  // 3. temperature; max, min finite, count finite.
  const float T = prm[kTemperature];
  const bool greedy = T == 0.f;
  const float inv = greedy ? 1.f : inverse_temperature(T);
  float mx = -kInf, mn = kInf;
  long long nf = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    float v = s[i];
    if (inv != 1.f) {
      v = scale_logit(v, inv);
      s[i] = v;
    }
    mx = fmaxf(mx, v);
    mn = fminf(mn, v > -kInf ? v : kInf);
    nf += v > -kInf;
  }
  {
    float fm = 0.f, fn = 0.f;
    long long b0 = bad, b1 = bad_hist;
    block_stats(fm, fn, b0, b1, sh.sel.red);  // the two flags
    bad = b0;
    bad_hist = b1;
    long long c2 = 0;
    block_stats(mx, mn, nf, c2, sh.sel.red);
  }
  if (bad) st = kBadLogits;
  else if (bad_hist) st = kBadHistory;
  else if (mx == kInf) st = kOverflow;
  else if (nf == 0) st = kNoToken;
  if (st != kOk) {
    finish_bad(st);
    return;
  }
  if (greedy) {
    if (threadIdx.x == 0) sh.argmax = ~0ull;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      if (s[i] == mx) {
        atomicMin(&sh.argmax, static_cast<unsigned long long>(i));
        break;
      }
    }
    __syncthreads();
    const int64_t am = static_cast<int64_t>(sh.argmax);
    if (threadIdx.x == 0) {
      status[row] = kOk;
      if (!write_probs) {
        tokens[row] = am;
        probs[row] = 1.f;
      }
    }
    if (write_probs)
      for (int64_t i = threadIdx.x; i < V; i += kThreads) o[i] = i == am ? 1.f : 0.f;
    return;
  }

  // 4-7. truncation.
  const float m = mx;
  float theta = kLowestF;
  const int64_t k = static_cast<int64_t>(prm[kTopK]);
  if (k > 0 && k < nf) theta = block_select(SrcCount{s}, V, static_cast<double>(k), false, mn, mx, sh.sel);
  const float top_p = prm[kTopP];
  if (top_p < 1.f) {
    const float v = block_select(SrcTopP{s, theta, m}, V, top_p, true, fmaxf(theta, mn), m, sh.sel);
    theta = fmaxf(theta, v);
  }
  const float min_p = prm[kMinP];
  if (min_p > 0.f) theta = fmaxf(theta, static_cast<float>(static_cast<double>(m) + log(static_cast<double>(min_p))));
  float mu = 0.f, tkey = -kInf;
  const float typ = prm[kTypicalP];
  if (typ < 1.f) {
    double zz[2] = {0.0, 0.0};
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float v = s[i];
      if (v >= theta) {
        const float w = exp_weight(v - m);
        zz[0] += w;
        zz[1] += static_cast<double>(w) * v;
      }
    }
    block_sum(zz, sh.sel.red);
    mu = static_cast<float>(zz[1] / zz[0]);
    const float lowest = fmaxf(theta, mn);
    const float span = fmaxf(m - mu, mu - lowest);
    tkey = block_select(SrcTypical{s, theta, m, mu}, V, typ, true, -span, 0.f, sh.sel);
  }

  // 8. draw, or write the distribution.
  const KeptWeight kw{s, theta, m, mu, tkey};
  if (write_probs) {
    double z[1] = {0.0};
    for (int64_t i = threadIdx.x; i < V; i += kThreads) z[0] += kw(i);
    block_sum(z, sh.sel.red);
    const float invz = static_cast<float>(1.0 / z[0]);
    for (int64_t i = threadIdx.x; i < V; i += kThreads) o[i] = kw(i) * invz;
    if (threadIdx.x == 0) status[row] = kOk;
    return;
  }
  double Z = 0.0;
  const int64_t tok = block_draw(kw, V, sample_uniform(a, row), sh.draw, Z);
  if (threadIdx.x == 0) {
    status[row] = tok >= 0 ? kOk : kNoToken;
    tokens[row] = tok;
    probs[row] = tok >= 0 ? static_cast<float>(kw(tok) / Z) : 0.f;
  }
}

}  // namespace cuda
}  // namespace sampling
}  // namespace mmfm
