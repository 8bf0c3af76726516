// Fused logits processing and sampling on the CPU (contract in sampling_kernels.h).
//
// OpenMP over rows; each row is processed by one thread in thread-local buffers of V floats
// (L2-resident for V up to ~250k), in a few passes and without sorting the vocabulary:
//   load      logits -> fp32, NaN/+inf check, allowed range and mask, penalties (sparse),
//             temperature, max / min / count of finite values;
//   top-k     streaming threshold filter: only values above the running k-th largest reach a
//             buffer of 2k that nth_element halves; the tokens >= the k-th value are then
//             gathered (with their weights) into a sparse view;
//   top-p     weighted multi-pivot bisection on s: each pass sums the weight above 16 pivots,
//   typical   keeps the sub-interval that holds the threshold and compacts it; a selection
//             ends by sorting at most kSmall candidates; typical does the same on
//             key = -|s - mu|;
//   min-p     a logit threshold, O(1);
//   draw      per-tile sums of the kept weights, then a scan inside one tile.
// The hot scans have AVX-512 versions (compare + mask test, compress); every loop also has a
// portable form that the compiler vectorises.
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "sampling/sampling_common.h"
#include "sampling/sampling_cpu.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace {

constexpr float kLowest = -std::numeric_limits<float>::max();  // s >= kLowest <=> s > -inf
constexpr int64_t kSumTile = 2048;  // elements per fp32 partial sum before it is added in fp64
constexpr int kPivots = 15;       // pivots p[1..15] per bisection pass (p[0] = lower end)
constexpr int64_t kSmall = 256;   // a selection ends by sorting at most this many candidates
constexpr int64_t kSlack = 16;    // spare floats after compaction outputs (whole-vector stores)

struct Scratch {
  std::vector<float> s;               // processed logits of the row [V]
  std::vector<float> w;               // weights exp(s - m) of the dense row [V]
  std::vector<float> cval, cw;        // sparse view: values and weights
  std::vector<int32_t> cidx;          // sparse view: token ids
  std::vector<float> ka, wa, kb, wb;  // compact (key, weight) candidates of a selection
  std::vector<float> heap;            // top-k filter buffer
  std::vector<int64_t> hist;          // sorted history of the row
  std::vector<std::pair<float, float>> small;
  std::vector<double> tsum;           // per-tile sums for the draw
};

Scratch& scratch() {
  static thread_local Scratch sc;
  return sc;
}

// A set of candidate tokens with their weights w = exp(s - m): the whole row (idx == nullptr:
// token i has value val[i]) or a gathered subset (token idx[i] has value val[i]).
struct View {
  const float* val = nullptr;
  const float* w = nullptr;
  const int32_t* idx = nullptr;
  int64_t n = 0;
  int64_t token(int64_t i) const { return idx ? idx[i] : i; }
};

// State of one row after processing: kept = {s >= theta} and, with typical, {-|s - mu| >= tkey}.
struct RowState {
  int32_t status = kOk;
  bool greedy = false;
  int64_t argmax = -1;
  float m = -kInf, smin = kInf;  // max and min finite s
  int64_t nfin = 0;              // number of finite s
  View view;
  float theta = kLowest;
  bool typical = false;
  float mu = 0.f, tkey = -kInf;
};

// Selection keys: larger keys are kept first.
struct KeyS {
  float operator()(float s) const { return s; }
#if defined(__AVX512F__)
  __m512 operator()(__m512 s) const { return s; }
#endif
};
struct KeyTypical {
  float mu;
  float operator()(float s) const { return -std::fabs(s - mu); }
#if defined(__AVX512F__)
  __m512 operator()(__m512 s) const {  // -|s - mu|: set the sign bit
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_sub_ps(s, _mm512_set1_ps(mu))),
                                               _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  }
#endif
};

// ---- load -----------------------------------------------------------------------------------
// s[i] = z_i (fp32) inside [lo, hi), -inf outside. Returns the number of NaN / +inf entries.
template <DType D>
int64_t load_row(const void* x, int64_t V, int64_t lo, int64_t hi, float* __restrict s) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < V; ++i) {
    const float z = load<D>(x, i);
    bad += !(z < kInf);
    s[i] = select_f((i >= lo) & (i < hi), z, -kInf);
  }
  return bad;
}

// Scales by inv_t (unless it is 1) and finds max, min finite, and the count of finite values.
void scale_and_stats(float* __restrict s, int64_t V, float inv_t, RowState& r) {
  float m = -kInf, mn = kInf;
  int64_t nf = 0;
  if (inv_t != 1.f) {
#pragma omp simd reduction(max : m) reduction(min : mn) reduction(+ : nf)
    for (int64_t i = 0; i < V; ++i) {
      const float v = scale_logit(s[i], inv_t);
      s[i] = v;
      m = std::max(m, v);
      mn = std::min(mn, select_f(v > -kInf, v, kInf));
      nf += v > -kInf;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(min : mn) reduction(+ : nf)
    for (int64_t i = 0; i < V; ++i) {
      const float v = s[i];
      m = std::max(m, v);
      mn = std::min(mn, select_f(v > -kInf, v, kInf));
      nf += v > -kInf;
    }
  }
  r.m = m;
  r.smin = mn;
  r.nfin = nf;
}

// Applies the penalties of the row's history to s (unscaled logits). Returns kOk or kBadHistory.
int32_t apply_history(float* s, int64_t V, const int64_t* h, int64_t L, const float* prm, bool active,
                      std::vector<int64_t>& buf) {
  grow(buf, static_cast<size_t>(L));
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (h[j] < 0) continue;
    if (h[j] >= V) return kBadHistory;
    buf[n++] = h[j];
  }
  if (!active || n == 0) return kOk;
  std::sort(buf.begin(), buf.begin() + n);
  const float rep = prm[kRepetitionPenalty], pres = prm[kPresencePenalty], freq = prm[kFrequencyPenalty];
  for (int64_t j = 0; j < n;) {
    int64_t e = j + 1;
    while (e < n && buf[e] == buf[j]) ++e;
    const int64_t t = buf[j];
    if (s[t] > -kInf) s[t] = apply_penalty(s[t], e - j, rep, pres, freq);
    j = e;
  }
  return kOk;
}

// ---- top-k ------------------------------------------------------------------------------------
// Keeps the k largest values offered so far (with multiplicity) in b[0..cnt); thr is the k-th
// of them once the buffer has been halved, and only values > thr can change the answer.
struct TopK {
  float* b;
  int64_t k, cap, cnt = 0;
  float thr = -kInf;
  void offer(float v) {
    if (!(v > thr)) return;
    b[cnt++] = v;
    if (cnt == cap) {
      std::nth_element(b, b + (k - 1), b + cnt, std::greater<float>());
      cnt = k;
      thr = b[k - 1];
    }
  }
};

#if !defined(__AVX512F__)
constexpr int64_t kBlock = 64;  // portable scans skip blocks whose max is below the threshold

// Max of kBlock floats with 16 independent lanes (no serial dependency; vectorises).
inline float block_max(const float* __restrict x) {
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = x[l];
  for (int j = 16; j < kBlock; j += 16)
    for (int l = 0; l < 16; ++l) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
  for (int w = 8; w > 0; w >>= 1)
    for (int l = 0; l < w; ++l) m[l] = m[l + w] > m[l] ? m[l + w] : m[l];
  return m[0];
}
#endif

// The k-th largest value of s[0..n) counted with multiplicity; needs 1 <= k < #finite.
float kth_largest(const float* __restrict s, int64_t n, int64_t k, std::vector<float>& buf) {
  const int64_t cap = std::max<int64_t>(2 * k, 1024);
  grow(buf, static_cast<size_t>(cap));
  TopK t{buf.data(), k, cap};
  int64_t i = 0;
#if defined(__AVX512F__)
  // Four vectors per step; a step whose values are all <= the running threshold costs four
  // compares and a mask test.
  for (; i + 64 <= n; i += 64) {
    const __m512 th = _mm512_set1_ps(t.thr);
    const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), th, _CMP_GT_OQ);
    const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i + 16), th, _CMP_GT_OQ);
    const __mmask16 m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i + 32), th, _CMP_GT_OQ);
    const __mmask16 m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i + 48), th, _CMP_GT_OQ);
    uint64_t mk = static_cast<uint64_t>(m0) | (static_cast<uint64_t>(m1) << 16) | (static_cast<uint64_t>(m2) << 32) |
                  (static_cast<uint64_t>(m3) << 48);
    while (mk) {
      t.offer(s[i + __builtin_ctzll(mk)]);
      mk &= mk - 1;
    }
  }
#else
  for (; i + kBlock <= n; i += kBlock)
    if (block_max(s + i) > t.thr)
      for (int64_t j = 0; j < kBlock; ++j) t.offer(s[i + j]);
#endif
  for (; i < n; ++i) t.offer(s[i]);
  std::nth_element(t.b, t.b + (k - 1), t.b + t.cnt, std::greater<float>());
  return t.b[k - 1];
}

// ---- compaction -------------------------------------------------------------------------------
// Appends (s[i], i0 + i) for s[i] >= theta, i in [0, n), to (cv, ci); returns the count.
// The outputs need kSlack spare entries (the AVX-512 path stores whole vectors).
int64_t compress_ge(const float* __restrict s, int64_t n, float theta, int32_t i0, float* __restrict cv,
                    int32_t* __restrict ci) {
  int64_t c = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 th = _mm512_set1_ps(theta);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(i0),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (; i + 16 <= n; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 x = _mm512_loadu_ps(s + i);
    const __mmask16 m = _mm512_cmp_ps_mask(x, th, _CMP_GE_OQ);
    if (m == 0) continue;
    _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(m, x));
    _mm512_storeu_si512(ci + c, _mm512_maskz_compress_epi32(m, idx));
    c += __builtin_popcount(static_cast<unsigned>(m));
  }
#endif
  for (; i < n; ++i) {  // branch-free: a store is dropped by not advancing
    cv[c] = s[i];
    ci[c] = i0 + static_cast<int32_t>(i);
    c += s[i] >= theta;
  }
  return c;
}

// Appends (key, w) of the view's tokens with s >= theta and lo <= key < hi to (ok, ow);
// returns the count. The outputs need kSlack spare entries.
template <class KeyFn>
int64_t compress_interval(const View& v, float theta, KeyFn key, float lo, float hi, float* __restrict ok,
                          float* __restrict ow) {
  const float* __restrict x = v.val;
  const float* __restrict w = v.w;
  int64_t c = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 th = _mm512_set1_ps(theta), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  for (; i + 16 <= v.n; i += 16) {
    const __m512 xs = _mm512_loadu_ps(x + i);
    const __m512 kx = key(xs);
    const __mmask16 m = _mm512_cmp_ps_mask(xs, th, _CMP_GE_OQ) & _mm512_cmp_ps_mask(kx, vlo, _CMP_GE_OQ) &
                        _mm512_cmp_ps_mask(kx, vhi, _CMP_LT_OQ);
    if (m == 0) continue;
    _mm512_storeu_ps(ok + c, _mm512_maskz_compress_ps(m, kx));
    _mm512_storeu_ps(ow + c, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(w + i)));
    c += __builtin_popcount(static_cast<unsigned>(m));
  }
#endif
  for (; i < v.n; ++i) {
    const float kx = key(x[i]);
    ok[c] = kx;
    ow[c] = w[i];
    c += x[i] >= theta && kx >= lo && kx < hi;
  }
  return c;
}

// Tokens of the dense row with s >= theta, in index order, with their weights exp(s - m).
View gather(const float* __restrict s, int64_t V, float theta, float m, Scratch& sc) {
  grow(sc.cval, static_cast<size_t>(V + kSlack));
  grow(sc.cidx, static_cast<size_t>(V + kSlack));
  grow(sc.cw, static_cast<size_t>(V + kSlack));
  float* cv = sc.cval.data();
  int32_t* ci = sc.cidx.data();
  float* cw = sc.cw.data();
#if defined(__AVX512F__)
  const int64_t n = compress_ge(s, V, theta, 0, cv, ci);
#else
  int64_t n = 0, b0 = 0;
  for (; b0 + kBlock <= V; b0 += kBlock)
    if (block_max(s + b0) >= theta) n += compress_ge(s + b0, kBlock, theta, static_cast<int32_t>(b0), cv + n, ci + n);
  n += compress_ge(s + b0, V - b0, theta, static_cast<int32_t>(b0), cv + n, ci + n);
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) cw[i] = exp_weight(cv[i] - m);
  return View{cv, cw, ci, n};
}

// Weights of the dense row.
View dense_view(const float* __restrict s, int64_t V, float m, Scratch& sc) {
  grow(sc.w, static_cast<size_t>(V));
  float* __restrict w = sc.w.data();
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) w[i] = exp_weight(s[i] - m);
  return View{s, w, nullptr, V};
}

// ---- weighted selection (top-p, typical) ---------------------------------------------------
// Pivots p[1..P] spread over [kmin, kmax], p[P] = kmax, non-decreasing; p[0] = lo.
void make_pivots(float lo, float kmin, float kmax, float* p) {
  p[0] = lo;
  const double a = kmin, w = static_cast<double>(kmax) - static_cast<double>(kmin);
  for (int j = 1; j < kPivots; ++j) p[j] = std::min(kmax, std::max(kmin, static_cast<float>(a + w * j / kPivots)));
  p[kPivots] = kmax;
}

// M[j] += weight of the tokens with s >= theta and key >= p[j], j = 0..P.
template <class KeyFn>
void pivot_sums(const float* __restrict x, const float* __restrict w, int64_t n, float theta, KeyFn key,
                const float* p, double* M) {
  for (int64_t t0 = 0; t0 < n; t0 += kSumTile) {
    const int64_t t1 = std::min(n, t0 + kSumTile);
    int64_t i = t0;
#if defined(__AVX512F__)
    __m512 acc[kPivots + 1];
    __m512 pv[kPivots + 1];
    for (int j = 0; j <= kPivots; ++j) {
      acc[j] = _mm512_setzero_ps();
      pv[j] = _mm512_set1_ps(p[j]);
    }
    const __m512 th = _mm512_set1_ps(theta);
    for (; i + 16 <= t1; i += 16) {
      const __m512 xs = _mm512_loadu_ps(x + i);
      const __m512 ws = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xs, th, _CMP_GE_OQ), _mm512_loadu_ps(w + i));
      const __m512 kx = key(xs);
      for (int j = 0; j <= kPivots; ++j)
        acc[j] = _mm512_mask_add_ps(acc[j], _mm512_cmp_ps_mask(kx, pv[j], _CMP_GE_OQ), acc[j], ws);
    }
    alignas(64) float lanes[16];
    for (int j = 0; j <= kPivots; ++j) {
      _mm512_store_ps(lanes, acc[j]);
      double sum = 0.0;
      for (int l = 0; l < 16; ++l) sum += lanes[l];
      M[j] += sum;
    }
#endif
    if (i < t1) {  // portable path (and the AVX-512 tail): keys and weights once, then per pivot
      alignas(64) float kt[kSumTile], wt[kSumTile];
      const int64_t nt = t1 - i;
#pragma omp simd
      for (int64_t e = 0; e < nt; ++e) {
        const bool in = x[i + e] >= theta;
        kt[e] = select_f(in, key(x[i + e]), -kInf);
        wt[e] = select_f(in, w[i + e], 0.f);
      }
      for (int j = 0; j <= kPivots; ++j) {
        const float pj = p[j];
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t e = 0; e < nt; ++e) a += select_f(kt[e] >= pj, wt[e], 0.f);
        M[j] += a;
      }
    }
  }
}

// M[j] += weight of the compact keys >= p[j].
void pivot_sums_compact(const float* __restrict k, const float* __restrict w, int64_t n, const float* p, double* M) {
  pivot_sums(k, w, n, -kInf, KeyS{}, p, M);
}

// The largest key value v among the view's tokens with s >= theta such that the weight of
// {key >= v} reaches frac * (total weight). Every participating key lies in [kmin, kmax]
// (kmin must be a true lower bound; kmax may be loose).
template <class KeyFn>
float weighted_select(const View& v, float theta, double frac, float kmin, float kmax, KeyFn key, Scratch& sc) {
  grow(sc.ka, static_cast<size_t>(v.n + kSlack));
  grow(sc.wa, static_cast<size_t>(v.n + kSlack));
  grow(sc.kb, static_cast<size_t>(v.n + kSlack));
  grow(sc.wb, static_cast<size_t>(v.n + kSlack));
  float* ka = sc.ka.data();
  float* wa = sc.wa.data();
  float* kb = sc.kb.data();
  float* wb = sc.wb.data();
  float p[kPivots + 1];
  double target, m_hi = 0.0;  // m_hi: weight of the keys >= hi
  float lo = kmin, hi = kInf;
  int64_t n;
  if (v.n <= kSmall) {  // few tokens: straight to the final sort
    n = compress_interval(v, theta, key, -kInf, kInf, ka, wa);
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += wa[i];
    target = frac * total;
  } else {
    double M[kPivots + 1] = {0};
    make_pivots(kmin, kmin, kmax, p);  // p[0] = kmin: M[0] is the whole participating weight
    pivot_sums(v.val, v.w, v.n, theta, key, p, M);
    target = frac * M[0];
    int J = 0;
    for (int j = 1; j <= kPivots; ++j)
      if (M[j] >= std::max(target, std::numeric_limits<double>::denorm_min())) J = j;
    lo = p[J];
    hi = J < kPivots ? p[J + 1] : kInf;
    m_hi = J < kPivots ? M[J + 1] : 0.0;
    n = compress_interval(v, theta, key, lo, hi, ka, wa);
  }
  // With frac == 0 the answer is the largest key of positive weight.
  target = std::max(target, std::numeric_limits<double>::denorm_min());
  auto minmax = [](const float* k, int64_t cnt, float& mn, float& mx) {
    float a = kInf, b = -kInf;
#pragma omp simd reduction(min : a) reduction(max : b)
    for (int64_t i = 0; i < cnt; ++i) {
      a = std::min(a, k[i]);
      b = std::max(b, k[i]);
    }
    mn = a;
    mx = b;
  };
  float cmin, cmax;
  minmax(ka, n, cmin, cmax);
  while (n > kSmall && cmin < cmax) {
    make_pivots(lo, cmin, cmax, p);
    double Mi[kPivots + 1] = {0};
    pivot_sums_compact(ka, wa, n, p, Mi);
    int J = 0;
    for (int j = 1; j <= kPivots; ++j)
      if (m_hi + Mi[j] >= target) J = j;
    const float nlo = p[J], nhi = J < kPivots ? p[J + 1] : hi;
    m_hi += J < kPivots ? Mi[J + 1] : 0.0;
    lo = nlo;
    hi = nhi;
    View c;
    c.val = ka;
    c.w = wa;
    c.n = n;
    n = compress_interval(c, -kInf, KeyS{}, lo, hi, kb, wb);
    std::swap(ka, kb);
    std::swap(wa, wb);
    minmax(ka, n, cmin, cmax);
  }
  if (n == 0) return lo;  // only by rounding: the interval's weight was all in m_hi
  if (cmin == cmax) return cmin;
  auto& sm = sc.small;
  sm.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) sm[i] = {ka[i], wa[i]};
  std::sort(sm.begin(), sm.end(), [](const std::pair<float, float>& a, const std::pair<float, float>& b) {
    return a.first > b.first;
  });
  double acc = m_hi;
  for (const auto& kw : sm) {
    acc += kw.second;
    if (acc >= target) return kw.first;
  }
  return sm.back().first;
}

// ---- one row ----------------------------------------------------------------------------------
template <DType D>
void process_row(const SampleArgs& a, int64_t row, RowState& r, Scratch& sc) {
  const int64_t V = a.V;
  const float* prm = a.params + row * kNumParams;
  r.status = check_params(prm);
  if (r.status != kOk) return;
  int64_t lo = 0, hi = V;
  if (a.allowed_range) {
    lo = a.allowed_range[2 * row];
    hi = a.allowed_range[2 * row + 1];
    if (!(lo >= 0 && lo < hi && hi <= V)) {
      r.status = kBadRange;
      return;
    }
  }
  grow(sc.s, static_cast<size_t>(V));
  float* s = sc.s.data();
  const void* x = static_cast<const char*>(a.logits) + row * V * static_cast<int64_t>(D == DType::F32 ? 4 : 2);
  if (load_row<D>(x, V, lo, hi, s) != 0) {
    r.status = kBadLogits;
    return;
  }
  if (a.allowed_mask) {
    const bool* mk = a.allowed_mask + row * V;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) s[i] = select_f(mk[i], s[i], -kInf);
  }
  if (a.history) {
    r.status = apply_history(s, V, a.history + row * a.L, a.L, prm, has_penalty(prm), sc.hist);
    if (r.status != kOk) return;
  }
  const float T = prm[kTemperature];
  r.greedy = T == 0.f;
  scale_and_stats(s, V, r.greedy ? 1.f : inverse_temperature(T), r);
  if (r.m == kInf) {
    r.status = kOverflow;
    return;
  }
  if (r.nfin == 0) {
    r.status = kNoToken;
    return;
  }
  if (r.greedy) {
    int64_t i = 0;
    while (s[i] != r.m) ++i;
    r.argmax = i;
    return;
  }
  const float m = r.m;
  r.theta = kLowest;
  bool sparse = false;
  const int64_t k = static_cast<int64_t>(prm[kTopK]);
  if (k > 0 && k < r.nfin) {
    r.theta = kth_largest(s, V, k, sc.heap);
    r.view = gather(s, V, r.theta, m, sc);
    sparse = true;
  }
  const float top_p = prm[kTopP];
  if (top_p < 1.f) {
    if (!sparse) r.view = dense_view(s, V, m, sc);
    const float v = weighted_select(r.view, r.theta, top_p, std::max(r.theta, r.smin), m, KeyS{}, sc);
    r.theta = std::max(r.theta, v);
  }
  const float min_p = prm[kMinP];
  if (min_p > 0.f) {
    r.theta = std::max(r.theta, static_cast<float>(static_cast<double>(m) + std::log(static_cast<double>(min_p))));
  }
  if (!sparse) {
    // Every truncation keeps an upper set of s: gather it once the threshold is known.
    if (r.theta > kLowest)
      r.view = gather(s, V, r.theta, m, sc);
    else
      r.view = dense_view(s, V, m, sc);
  }
  const float typ = prm[kTypicalP];
  if (typ < 1.f) {
    // mu = sum q s over the kept set.
    const float* __restrict xv = r.view.val;
    const float* __restrict wv = r.view.w;
    const int64_t n = r.view.n;
    const float th = r.theta;
    // In fp64: the kept set of typical moves with mu (tokens on either side of mu swap order
    // when it moves by more than their key gap), so mu must be right to the last fp32 bit.
    double z = 0.0, zs = 0.0;
#pragma omp simd reduction(+ : z, zs)
    for (int64_t i = 0; i < n; ++i) {
      const bool in = xv[i] >= th;
      const double w = select_f(in, wv[i], 0.f);
      z += w;
      zs += w * static_cast<double>(select_f(in, xv[i], 0.f));
    }
    r.typical = true;
    r.mu = static_cast<float>(zs / z);
    const float lowest = std::max(r.theta, r.smin);
    const float span = std::max(m - r.mu, r.mu - lowest);
    r.tkey = weighted_select(r.view, r.theta, typ, -span, 0.f, KeyTypical{r.mu}, sc);
  }
}

// Kept weights of the view's tokens [t0, t0 + nt) into wt; returns their sum.
inline float tile_kept_weights(const RowState& r, int64_t t0, int64_t nt, float* __restrict wt) {
  const float* __restrict x = r.view.val + t0;
  const float* __restrict w = r.view.w + t0;
  const float th = r.theta, mu = r.mu, tk = r.typical ? r.tkey : -kInf;
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < nt; ++i) {
    const bool in = (x[i] >= th) & (-std::fabs(x[i] - mu) >= tk);  // & not &&: no branch
    wt[i] = select_f(in, w[i], 0.f);
    a += wt[i];
  }
  return a;
}

void draw_row(const RowState& r, double u, Scratch& sc, int64_t& token, float& prob) {
  const View& v = r.view;
  const int64_t ntiles = (v.n + kTile - 1) / kTile;
  grow(sc.tsum, static_cast<size_t>(ntiles));
  alignas(64) float wt[kTile];
  double Z = 0.0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t t0 = t * kTile;
    sc.tsum[t] = tile_kept_weights(r, t0, std::min(kTile, v.n - t0), wt);
    Z += sc.tsum[t];
  }
  // Inverse CDF: the tile where the running sum passes u * Z, then the token inside it. If
  // rounding leaves the target beyond the last tile, the last token of positive weight wins.
  double target = u * Z, cum = 0.0;
  const int64_t t = find_tile(sc.tsum.data(), ntiles, target, cum);
  const int64_t t0 = t * kTile, nt = std::min(kTile, v.n - t0);
  tile_kept_weights(r, t0, nt, wt);
  int64_t pick = -1, last = 0;
  double acc = cum;
  for (int64_t i = 0; i < nt; ++i) {
    if (wt[i] > 0.f) {
      last = i;
      acc += wt[i];
      if (acc > target) {
        pick = i;
        break;
      }
    }
  }
  if (pick < 0) pick = last;
  token = v.token(t0 + pick);
  prob = static_cast<float>(wt[pick] / Z);
}

void write_probs(const RowState& r, int64_t V, float* __restrict out) {
  const View& v = r.view;
  alignas(64) float wt[kTile];
  double Z = 0.0;
  for (int64_t t0 = 0; t0 < v.n; t0 += kTile) Z += tile_kept_weights(r, t0, std::min(kTile, v.n - t0), wt);
  const float inv = static_cast<float>(1.0 / Z);
  if (v.idx == nullptr) {
    for (int64_t t0 = 0; t0 < V; t0 += kTile) {
      const int64_t nt = std::min(kTile, V - t0);
      tile_kept_weights(r, t0, nt, wt);
#pragma omp simd
      for (int64_t i = 0; i < nt; ++i) out[t0 + i] = wt[i] * inv;
    }
  } else {
    std::fill(out, out + V, 0.f);
    for (int64_t t0 = 0; t0 < v.n; t0 += kTile) {
      const int64_t nt = std::min(kTile, v.n - t0);
      tile_kept_weights(r, t0, nt, wt);
      for (int64_t i = 0; i < nt; ++i)
        if (wt[i] > 0.f) out[v.idx[t0 + i]] = wt[i] * inv;
    }
  }
}

void process(const SampleArgs& a, int64_t row, RowState& r, Scratch& sc) {
  switch (a.dt) {
    case DType::BF16:
      process_row<DType::BF16>(a, row, r, sc);
      break;
    case DType::F16:
      process_row<DType::F16>(a, row, r, sc);
      break;
    default:
      process_row<DType::F32>(a, row, r, sc);
  }
}

// Processes every row (OpenMP over rows, thread-local scratch), records its status and hands
// the processed row to emit(row, r, sc).
template <class Emit>
void for_each_row(const SampleArgs& a, int32_t* status, Emit emit) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(row_threads(a.B))
  for (int64_t row = 0; row < a.B; ++row) {
    Scratch& sc = scratch();
    RowState r;
    process(a, row, r, sc);
    status[row] = r.status;
    emit(row, r, sc);
  }
}

}  // namespace

void sample_cpu(const SampleArgs& a, int64_t* tokens, float* probs, int32_t* status) {
  for_each_row(a, status, [&](int64_t row, const RowState& r, Scratch& sc) {
    if (r.status != kOk) {
      tokens[row] = -1;
      probs[row] = 0.f;
    } else if (r.greedy) {
      tokens[row] = r.argmax;
      probs[row] = 1.f;
    } else {
      draw_row(r, sample_uniform(a, row), sc, tokens[row], probs[row]);
    }
  });
}

void processed_probs_cpu(const SampleArgs& a, float* out, int32_t* status) {
  for_each_row(a, status, [&](int64_t row, const RowState& r, Scratch&) {
    float* o = out + row * a.V;
    if (r.status != kOk) {
      std::fill(o, o + a.V, 0.f);
    } else if (r.greedy) {
      std::fill(o, o + a.V, 0.f);
      o[r.argmax] = 1.f;
    } else {
      write_probs(r, a.V, o);
    }
  });
}

}  // namespace sampling
}  // namespace mmfm
