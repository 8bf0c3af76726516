// Lossless speculative verification on the CPU (contract in sampling_kernels.h): chain
// verification (one draft per position) and multi-draft recursive rejection sampling at one
// position. OpenMP over rows; a row touches only the distribution rows it needs: accepting a
// draft reads two numbers, a rejection or the final draw costs one or two passes over V.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sampling/sampling_common.h"
#include "sampling/sampling_cpu.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace {

struct VScratch {
  std::vector<float> r;       // working distribution [V]
  std::vector<double> tsum;   // per-tile sums
  std::vector<float> saved;   // residual values at removed candidates
};

VScratch& vscratch() {
  static thread_local VScratch sc;
  return sc;
}

// Inverse CDF over non-negative weights w[0..V): the first i whose prefix sum exceeds u * sum.
// Returns -1 when the weights have no positive mass.
int64_t draw_weights(const float* __restrict w, int64_t V, double u, VScratch& sc) {
  const int64_t ntiles = (V + kTile - 1) / kTile;
  grow(sc.tsum, static_cast<size_t>(ntiles));
  double Z = 0.0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t t0 = t * kTile, t1 = std::min(V, t0 + kTile);
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t i = t0; i < t1; ++i) a += w[i];
    sc.tsum[t] = a;
    Z += a;
  }
  if (!(Z > 0.0)) return -1;
  double target = u * Z, cum = 0.0;
  const int64_t t = find_tile(sc.tsum.data(), ntiles, target, cum);
  const int64_t t0 = t * kTile, t1 = std::min(V, t0 + kTile);
  int64_t last = -1;
  double acc = cum;
  for (int64_t i = t0; i < t1; ++i) {
    if (w[i] > 0.f) {
      last = i;
      acc += w[i];
      if (acc > target) return i;
    }
  }
  return last;
}

// r = max(0, p) for a typed row; returns false on NaN, inf or negative entries.
template <DType D>
bool copy_row(const void* p, int64_t V, float* __restrict r) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < V; ++i) {
    const float x = load<D>(p, i);
    bad += !valid_prob(x);
    r[i] = select_f(x > 0.f, x, 0.f);
  }
  return bad == 0;
}

// r = max(0, p - q) for typed rows; returns false on NaN, inf or negative entries.
template <DType D>
bool residual_row(const void* p, const void* q, int64_t V, float* __restrict r) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < V; ++i) {
    const float a = load<D>(p, i), b = load<D>(q, i);
    bad += !valid_prob(a) + !valid_prob(b);
    const float d = a - b;
    r[i] = select_f(d > 0.f, d, 0.f);
  }
  return bad == 0;
}

template <DType D>
const void* row_ptr(const void* base, int64_t row, int64_t V) {
  return static_cast<const char*>(base) + row * V * static_cast<int64_t>(D == DType::F32 ? 4 : 2);
}

template <DType D>
void chain_row(const void* p, const void* q, const int64_t* draft, int64_t b, int64_t G, int64_t V, uint64_t seed,
               uint64_t offset, int64_t* accepted, int64_t* next_token, int32_t* status) {
  VScratch& sc = vscratch();
  grow(sc.r, static_cast<size_t>(V));
  float* r = sc.r.data();
  accepted[b] = 0;
  next_token[b] = -1;
  status[b] = kOk;
  for (int64_t j = 0; j < G; ++j) {
    if (draft[b * G + j] < 0 || draft[b * G + j] >= V) {
      status[b] = kBadDraft;
      return;
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    const int64_t x = draft[b * G + j];
    const void* pj = row_ptr<D>(p, b * (G + 1) + j, V);
    const void* qj = row_ptr<D>(q, b * G + j, V);
    const float px = load<D>(pj, x), qx = load<D>(qj, x);
    if (!valid_prob(px) || !valid_prob(qx)) {
      status[b] = kBadLogits;
      return;
    }
    const Uniform2 u = uniforms(seed, offset, b, static_cast<uint32_t>(j));
    if (u.u0 * static_cast<double>(qx) < static_cast<double>(px)) continue;  // accept with min(1, p/q)
    accepted[b] = j;
    if (!residual_row<D>(pj, qj, V, r)) {
      status[b] = kBadLogits;
      return;
    }
    int64_t t = draw_weights(r, V, u.u1, sc);
    if (t < 0) {  // p_j == q_j: rejection happened only by rounding; draw from p_j
      copy_row<D>(pj, V, r);
      t = draw_weights(r, V, u.u1, sc);
    }
    if (t < 0) status[b] = kBadProbs;
    next_token[b] = t;
    return;
  }
  accepted[b] = G;
  if (!copy_row<D>(row_ptr<D>(p, b * (G + 1) + G, V), V, r)) {
    status[b] = kBadLogits;
    return;
  }
  const int64_t t = draw_weights(r, V, uniforms(seed, offset, b, static_cast<uint32_t>(G)).u0, sc);
  if (t < 0) status[b] = kBadProbs;
  next_token[b] = t;
}

template <DType D>
void multi_draft_row(const void* p, const void* q, bool q_per_draft, const int64_t* cand, int64_t b, int64_t K,
                     int64_t V, bool replacement, uint64_t seed, uint64_t offset, int64_t* token,
                     int64_t* accepted_index, int32_t* status) {
  VScratch& sc = vscratch();
  grow(sc.r, static_cast<size_t>(V));
  grow(sc.saved, static_cast<size_t>(K));
  float* r = sc.r.data();
  const int64_t* c = cand + b * K;
  token[b] = -1;
  accepted_index[b] = -1;
  status[b] = kOk;
  for (int64_t i = 0; i < K; ++i) {
    if (c[i] < 0 || c[i] >= V) {
      status[b] = kBadDraft;
      return;
    }
    if (!replacement) {
      for (int64_t l = 0; l < i; ++l) {
        if (c[l] == c[i]) {
          status[b] = kDuplicateDraft;
          return;
        }
      }
    }
  }
  if (!copy_row<D>(row_ptr<D>(p, b, V), V, r)) {
    status[b] = kBadLogits;
    return;
  }
  double R = 0.0;  // sum of the (unnormalised) current target r
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    float a = 0.f;
    const int64_t t1 = std::min(V, t0 + kTile);
#pragma omp simd reduction(+ : a)
    for (int64_t i = t0; i < t1; ++i) a += r[i];
    R += a;
  }
  double removed = 0.0;  // q-mass of the candidates already drawn (without replacement)
  int64_t i = 0;
  for (; i < K && R > 0.0; ++i) {
    const int64_t x = c[i];
    const void* qi = row_ptr<D>(q, q_per_draft ? b * K + i : b, V);
    double scale = 1.0;
    if (!replacement) {
      if (!(1.0 - removed > 0.0)) break;  // q has no mass left: no further candidate could be drawn
      scale = 1.0 / (1.0 - removed);
    }
    const float qx_raw = load<D>(qi, x);
    if (!valid_prob(qx_raw)) {
      status[b] = kBadLogits;
      return;
    }
    const double qx = static_cast<double>(qx_raw) * scale;
    const double u0 = uniforms(seed, offset, b, static_cast<uint32_t>(i)).u0;
    if (u0 * qx * R < static_cast<double>(r[x])) {  // accept with min(1, (r/R)(x) / q_i(x))
      token[b] = x;
      accepted_index[b] = i;
      return;
    }
    // r <- max(0, r - R q_i); q_i is 0 at the candidates removed before this one.
    for (int64_t l = 0; l < (replacement ? 0 : i); ++l) sc.saved[l] = r[c[l]];
    const float f = static_cast<float>(R * scale);
    int64_t bad = 0;
    double R2 = 0.0;
    for (int64_t t0 = 0; t0 < V; t0 += kTile) {
      const int64_t t1 = std::min(V, t0 + kTile);
      float a = 0.f;
#pragma omp simd reduction(+ : a, bad)
      for (int64_t y = t0; y < t1; ++y) {
        const float qy = load<D>(qi, y);
        bad += !valid_prob(qy);
        const float d = r[y] - f * qy;
        r[y] = select_f(d > 0.f, d, 0.f);
        a += r[y];
      }
      R2 += a;
    }
    if (bad) {
      status[b] = kBadLogits;
      return;
    }
    if (!replacement) {
      for (int64_t l = 0; l < i; ++l) {
        R2 += static_cast<double>(sc.saved[l]) - static_cast<double>(r[c[l]]);
        r[c[l]] = sc.saved[l];
      }
      removed += static_cast<double>(qx_raw);
    }
    R = R2;
  }
  // Every candidate rejected: draw from the residual (from p if rounding left it empty).
  const double u = uniforms(seed, offset, b, static_cast<uint32_t>(K)).u0;
  int64_t t = draw_weights(r, V, u, sc);
  if (t < 0) {
    copy_row<D>(row_ptr<D>(p, b, V), V, r);
    t = draw_weights(r, V, u, sc);
  }
  if (t < 0) status[b] = kBadProbs;
  token[b] = t;
  (void)i;
}

}  // namespace

void verify_chain_cpu(const void* p, DType pdt, const void* q, DType qdt, const int64_t* draft, int64_t B, int64_t G,
                      int64_t V, uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token,
                      int32_t* status) {
  (void)qdt;  // the binding requires p and q to share a dtype
#pragma omp parallel for schedule(dynamic, 1) num_threads(row_threads(B))
  for (int64_t b = 0; b < B; ++b) {
    switch (pdt) {
      case DType::BF16:
        chain_row<DType::BF16>(p, q, draft, b, G, V, seed, offset, accepted, next_token, status);
        break;
      case DType::F16:
        chain_row<DType::F16>(p, q, draft, b, G, V, seed, offset, accepted, next_token, status);
        break;
      default:
        chain_row<DType::F32>(p, q, draft, b, G, V, seed, offset, accepted, next_token, status);
    }
  }
}

void verify_multi_draft_cpu(const void* p, DType pdt, const void* q, DType qdt, bool q_per_draft, const int64_t* cand,
                            int64_t B, int64_t K, int64_t V, bool replacement, uint64_t seed, uint64_t offset,
                            int64_t* token, int64_t* accepted_index, int32_t* status) {
  (void)qdt;
#pragma omp parallel for schedule(dynamic, 1) num_threads(row_threads(B))
  for (int64_t b = 0; b < B; ++b) {
    switch (pdt) {
      case DType::BF16:
        multi_draft_row<DType::BF16>(p, q, q_per_draft, cand, b, K, V, replacement, seed, offset, token,
                                     accepted_index, status);
        break;
      case DType::F16:
        multi_draft_row<DType::F16>(p, q, q_per_draft, cand, b, K, V, replacement, seed, offset, token,
                                    accepted_index, status);
        break;
      default:
        multi_draft_row<DType::F32>(p, q, q_per_draft, cand, b, K, V, replacement, seed, offset, token,
                                    accepted_index, status);
    }
  }
}

}  // namespace sampling
}  // namespace mmfm
