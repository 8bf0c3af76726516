// Fused logits processing and sampling on the CPU (contract in sampling_kernels.h).
//
// OpenMP over rows; each row is processed by one thread in a thread-local buffer of V floats
// (L2-resident for V up to ~400k), in a few passes and without sorting the vocabulary:
//   load      logits -> fp32, NaN/+inf check, allowed range and mask, penalties (sparse),
//             temperature, max / min / count of finite values;
//   top-k     streaming threshold filter: 64-element blocks whose max is below the running
//             threshold are skipped; survivors go to a buffer of 2k that nth_element halves;
//             then the tokens >= the k-th value are gathered into a sparse view;
//   top-p     weighted multi-pivot bisection on s (15 pivots per pass, each pass narrows the
//   typical   interval holding the threshold and compacts it), finished by sorting at most
//             kSmall candidates; typical does the same on key = -|s - mu|;
//   min-p     a logit threshold, O(1);
//   draw      per-tile sums of the kept weights, then a scan inside one tile.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "sampling/sampling_common.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLowest = -std::numeric_limits<float>::max();  // s >= kLowest <=> s finite (s < +inf)
constexpr int64_t kTile = 256;   // elements per vectorised tile
constexpr int kPivots = 15;      // pivots per bisection pass
constexpr int64_t kSmall = 256;  // a selection ends by sorting at most this many candidates
constexpr int64_t kBlock = 64;   // block of the skip-by-block-max scans

struct Scratch {
  std::vector<float> s;         // processed logits of the row [V]
  std::vector<float> cval;      // sparse view: values
  std::vector<int32_t> cidx;    // sparse view: indices
  std::vector<float> ka, wa, kb, wb;  // compact (key, weight) candidates of a selection
  std::vector<float> heap;      // top-k filter buffer
  std::vector<int64_t> hist;    // sorted history of the row
  std::vector<std::pair<float, float>> small;
  std::vector<double> tsum;     // per-tile sums for the draw
};

Scratch& scratch() {
  static thread_local Scratch sc;
  return sc;
}

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// A set of candidate tokens: the whole row (idx == nullptr: token i is val[i]) or a gathered
// subset (token idx[i] has value val[i]).
struct View {
  const float* val = nullptr;
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

struct KeyS {
  float operator()(float s) const { return s; }
};
struct KeyTypical {
  float mu;
  float operator()(float s) const { return -std::fabs(s - mu); }
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
    s[i] = (i >= lo && i < hi) ? z : -kInf;
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
      mn = std::min(mn, v > -kInf ? v : kInf);
      nf += v > -kInf;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(min : mn) reduction(+ : nf)
    for (int64_t i = 0; i < V; ++i) {
      const float v = s[i];
      m = std::max(m, v);
      mn = std::min(mn, v > -kInf ? v : kInf);
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
// The k-th largest value of s[0..n) counted with multiplicity; needs 1 <= k < #finite.
float kth_largest(const float* __restrict s, int64_t n, int64_t k, std::vector<float>& buf) {
  const int64_t cap = std::max<int64_t>(2 * k, 1024);
  grow(buf, static_cast<size_t>(cap));
  float* b = buf.data();
  int64_t cnt = 0;
  float thr = -kInf;  // values > thr may still be among the k largest
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    float bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = b0; i < b1; ++i) bm = std::max(bm, s[i]);
    if (!(bm > thr)) continue;
    for (int64_t i = b0; i < b1; ++i) {
      if (s[i] > thr) {
        b[cnt++] = s[i];
        if (cnt == cap) {  // keep the k largest; later values must beat the k-th of them
          std::nth_element(b, b + (k - 1), b + cnt, std::greater<float>());
          cnt = k;
          thr = b[k - 1];
        }
      }
    }
  }
  std::nth_element(b, b + (k - 1), b + cnt, std::greater<float>());
  return b[k - 1];
}

// Tokens of the dense row with s >= theta, in index order.
View gather(const float* __restrict s, int64_t V, float theta, Scratch& sc) {
  grow(sc.cval, static_cast<size_t>(V));
  grow(sc.cidx, static_cast<size_t>(V));
  float* cv = sc.cval.data();
  int32_t* ci = sc.cidx.data();
  int64_t c = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    float bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = b0; i < b1; ++i) bm = std::max(bm, s[i]);
    if (!(bm >= theta)) continue;
    for (int64_t i = b0; i < b1; ++i) {
      if (s[i] >= theta) {
        cv[c] = s[i];
        ci[c] = static_cast<int32_t>(i);
        ++c;
      }
    }
  }
  View v;
  v.val = cv;
  v.idx = ci;
  v.n = c;
  return v;
}

// ---- weighted selection (top-p, typical) ---------------------------------------------------
// Pivots p[1..P] spread over [kmin, kmax], p[P] = kmax, non-decreasing; p[0] = lo.
void make_pivots(float lo, float kmin, float kmax, float* p) {
  p[0] = lo;
  const double a = kmin, w = static_cast<double>(kmax) - static_cast<double>(kmin);
  for (int j = 1; j < kPivots; ++j) p[j] = std::min(kmax, std::max(kmin, static_cast<float>(a + w * j / kPivots)));
  p[kPivots] = kmax;
}

// Adds, for one tile of (key, weight), the weight of the keys >= p[j] to M[j], j = 0..P.
inline void tile_pivot_sums(const float* __restrict kt, const float* __restrict wt, int64_t nt, const float* p,
                            double* M) {
  for (int j = 0; j <= kPivots; ++j) {
    const float pj = p[j];
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < nt; ++i) a += kt[i] >= pj ? wt[i] : 0.f;
    M[j] += a;
  }
}

// The largest key value v among the view's tokens with s >= theta such that the weight of
// {key >= v} reaches frac * (total weight); weights w = exp(s - m). kmin/kmax bound the keys.
template <class KeyFn>
float weighted_select(const View& v, float theta, float m, double frac, float kmin, float kmax, KeyFn key,
                      Scratch& sc) {
  float p[kPivots + 1];
  double M[kPivots + 1] = {0};
  alignas(64) float kt[kTile], wt[kTile];
  make_pivots(-kInf, kmin, kmax, p);
  for (int64_t t0 = 0; t0 < v.n; t0 += kTile) {
    const int64_t nt = std::min(kTile, v.n - t0);
    const float* __restrict x = v.val + t0;
#pragma omp simd
    for (int64_t i = 0; i < nt; ++i) {
      const bool in = x[i] >= theta;
      kt[i] = in ? key(x[i]) : -kInf;
      wt[i] = in ? exp_weight(x[i] - m) : 0.f;
    }
    tile_pivot_sums(kt, wt, nt, p, M);
  }
  // With frac == 0 the answer is the largest key of positive weight.
  const double target = std::max(frac * M[0], std::numeric_limits<double>::denorm_min());
  int J = 0;
  for (int j = 1; j <= kPivots; ++j)
    if (M[j] >= target) J = j;
  float lo = p[J], hi = J < kPivots ? p[J + 1] : kInf;
  double m_hi = J < kPivots ? M[J + 1] : 0.0;  // weight of keys >= hi

  // Compact the tokens with lo <= key < hi.
  grow(sc.ka, static_cast<size_t>(v.n));
  grow(sc.wa, static_cast<size_t>(v.n));
  float* ka = sc.ka.data();
  float* wa = sc.wa.data();
  int64_t n = 0;
  float cmin = kInf, cmax = -kInf;
  for (int64_t i = 0; i < v.n; ++i) {
    const float x = v.val[i];
    if (!(x >= theta)) continue;
    const float kx = key(x);
    if (kx >= lo && kx < hi) {
      ka[n] = kx;
      wa[n] = exp_weight(x - m);
      cmin = std::min(cmin, kx);
      cmax = std::max(cmax, kx);
      ++n;
    }
  }
  grow(sc.kb, static_cast<size_t>(v.n));
  grow(sc.wb, static_cast<size_t>(v.n));
  float* kb = sc.kb.data();
  float* wb = sc.wb.data();

  while (n > kSmall && cmin < cmax) {
    make_pivots(lo, cmin, cmax, p);
    double Mi[kPivots + 1] = {0};
    for (int64_t t0 = 0; t0 < n; t0 += kTile) tile_pivot_sums(ka + t0, wa + t0, std::min(kTile, n - t0), p, Mi);
    J = 0;
    for (int j = 1; j <= kPivots; ++j)
      if (m_hi + Mi[j] >= target) J = j;
    const float nlo = p[J], nhi = J < kPivots ? p[J + 1] : hi;
    m_hi += J < kPivots ? Mi[J + 1] : 0.0;
    lo = nlo;
    hi = nhi;
    int64_t n2 = 0;
    cmin = kInf;
    cmax = -kInf;
    for (int64_t i = 0; i < n; ++i) {
      const float kx = ka[i];
      if (kx >= lo && kx < hi) {
        kb[n2] = kx;
        wb[n2] = wa[i];
        cmin = std::min(cmin, kx);
        cmax = std::max(cmax, kx);
        ++n2;
      }
    }
    std::swap(ka, kb);
    std::swap(wa, wb);
    n = n2;
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
    for (int64_t i = 0; i < V; ++i) s[i] = mk[i] ? s[i] : -kInf;
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
  r.view.val = s;
  r.view.n = V;
  r.theta = kLowest;
  const int64_t k = static_cast<int64_t>(prm[kTopK]);
  if (k > 0 && k < r.nfin) {
    r.theta = kth_largest(s, V, k, sc.heap);
    r.view = gather(s, V, r.theta, sc);
  }
  const float top_p = prm[kTopP];
  if (top_p < 1.f) {
    const float v = weighted_select(r.view, r.theta, m, top_p, std::max(r.theta, r.smin), m, KeyS{}, sc);
    r.theta = std::max(r.theta, v);
  }
  const float min_p = prm[kMinP];
  if (min_p > 0.f) {
    r.theta = std::max(r.theta, static_cast<float>(static_cast<double>(m) + std::log(static_cast<double>(min_p))));
  }
  if (r.view.idx == nullptr && r.theta > kLowest) r.view = gather(s, V, r.theta, sc);
  const float typ = prm[kTypicalP];
  if (typ < 1.f) {
    // mu = sum q s over the kept set.
    double z = 0.0, zs = 0.0;
    const View& v = r.view;
    for (int64_t t0 = 0; t0 < v.n; t0 += kTile) {
      const int64_t nt = std::min(kTile, v.n - t0);
      const float* __restrict xv = v.val + t0;
      const float th = r.theta;
      float a0 = 0.f, a1 = 0.f;
#pragma omp simd reduction(+ : a0, a1)
      for (int64_t i = 0; i < nt; ++i) {
        const float w = xv[i] >= th ? exp_weight(xv[i] - m) : 0.f;
        a0 += w;
        a1 += w * (xv[i] >= th ? xv[i] : 0.f);
      }
      z += a0;
      zs += a1;
    }
    r.typical = true;
    r.mu = static_cast<float>(zs / z);
    const float lowest = std::max(r.theta, r.smin);
    const float span = std::max(m - r.mu, r.mu - lowest);
    r.tkey = weighted_select(r.view, r.theta, m, typ, -span, 0.f, KeyTypical{r.mu}, sc);
  }
}

// Kept weights of one tile.
inline float tile_kept_weights(const RowState& r, const float* __restrict x, int64_t nt, float* __restrict wt) {
  const float th = r.theta, m = r.m, mu = r.mu, tk = r.typical ? r.tkey : -kInf;
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < nt; ++i) {
    const bool in = x[i] >= th && -std::fabs(x[i] - mu) >= tk;
    const float w = in ? exp_weight(x[i] - m) : 0.f;
    wt[i] = w;
    a += w;
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
    sc.tsum[t] = tile_kept_weights(r, v.val + t0, std::min(kTile, v.n - t0), wt);
    Z += sc.tsum[t];
  }
  // Inverse CDF: the tile where the running sum passes u * Z, then the token inside it. If
  // rounding leaves the target beyond the last tile, the last token of positive weight wins.
  double target = u * Z, cum = 0.0;
  int64_t t = 0;
  for (; t < ntiles; ++t) {
    if (cum + sc.tsum[t] > target) break;
    cum += sc.tsum[t];
  }
  if (t == ntiles) {
    target = std::numeric_limits<double>::infinity();
    for (t = ntiles - 1; t > 0 && !(sc.tsum[t] > 0.0); --t) {
    }
  }
  const int64_t t0 = t * kTile, nt = std::min(kTile, v.n - t0);
  tile_kept_weights(r, v.val + t0, nt, wt);
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

void write_probs(const RowState& r, int64_t V, float* __restrict out, Scratch& sc) {
  const View& v = r.view;
  alignas(64) float wt[kTile];
  double Z = 0.0;
  for (int64_t t0 = 0; t0 < v.n; t0 += kTile) Z += tile_kept_weights(r, v.val + t0, std::min(kTile, v.n - t0), wt);
  const float inv = static_cast<float>(1.0 / Z);
  if (v.idx == nullptr) {
    for (int64_t t0 = 0; t0 < V; t0 += kTile) {
      const int64_t nt = std::min(kTile, V - t0);
      tile_kept_weights(r, v.val + t0, nt, wt);
#pragma omp simd
      for (int64_t i = 0; i < nt; ++i) out[t0 + i] = wt[i] * inv;
    }
  } else {
    std::fill(out, out + V, 0.f);
    for (int64_t t0 = 0; t0 < v.n; t0 += kTile) {
      const int64_t nt = std::min(kTile, v.n - t0);
      tile_kept_weights(r, v.val + t0, nt, wt);
      for (int64_t i = 0; i < nt; ++i)
        if (wt[i] > 0.f) out[v.idx[t0 + i]] = wt[i] * inv;
    }
  }
  (void)sc;
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

}  // namespace

void sample_cpu(const SampleArgs& a, int64_t* tokens, float* probs, int32_t* status) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t row = 0; row < a.B; ++row) {
    Scratch& sc = scratch();
    RowState r;
    process(a, row, r, sc);
    status[row] = r.status;
    if (r.status != kOk) {
      tokens[row] = -1;
      probs[row] = 0.f;
    } else if (r.greedy) {
      tokens[row] = r.argmax;
      probs[row] = 1.f;
    } else {
      draw_row(r, uniforms(a.seed, a.offset, row, 0).u0, sc, tokens[row], probs[row]);
    }
  }
}

void processed_probs_cpu(const SampleArgs& a, float* out, int32_t* status) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t row = 0; row < a.B; ++row) {
    Scratch& sc = scratch();
    RowState r;
    process(a, row, r, sc);
    status[row] = r.status;
    float* o = out + row * a.V;
    if (r.status != kOk) {
      std::fill(o, o + a.V, 0.f);
    } else if (r.greedy) {
      std::fill(o, o + a.V, 0.f);
      o[r.argmax] = 1.f;
    } else {
      write_probs(r, a.V, o, sc);
    }
  }
}

}  // namespace sampling
}  // namespace mmfm
