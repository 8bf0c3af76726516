// Attention for the few queries of a decode step or a draft tree against a static KV cache.
//
// Why not torch's scaled_dot_product_attention: for one query per head over a few hundred keys
// the work is a few tens of thousands of multiply-adds, and SDPA's CPU path spends ~25 us per
// call around them (buffers, blocking, the mask); a decode step calls it once per layer. Here
// each (row, query, head) is one pass: scores for every visible key (8 keys at a time: 8 dot
// products over hd, reduced together), an exact softmax (max, then exp with a vectorised
// Cephes polynomial), then the value sum. Keys are read straight from the cache's
// [B, Hkv, T, hd] layout; grouped-query heads index their kv head. Masked keys are skipped, never
// scored, so no -inf enters the arithmetic.
#include "attention/attention_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MMFM_ATTN_AVX2 1
#endif

namespace mmfm {
namespace attention {
namespace {

// The keys query i of row b sees, in increasing order: [0, prefix) then prefix + j for allowed j.
int64_t visible_keys(int64_t prefix, int64_t n, int64_t i, const bool* mask, int64_t* extra) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool ok = mask != nullptr ? mask[i * n + j] : j <= i;
    if (ok) extra[m++] = prefix + j;
  }
  return m;
}

void one_query_generic(const float* q, const float* kh, const float* vh, int64_t prefix, const int64_t* extra,
                       int64_t n_extra, int64_t hd, float scale, float* s, float* out) {
  const int64_t total = prefix + n_extra;
  float mx = -INFINITY;
  for (int64_t t = 0; t < total; ++t) {
    const int64_t key = t < prefix ? t : extra[t - prefix];
    const float* kt = kh + key * hd;
    float d = 0.f;
    for (int64_t c = 0; c < hd; ++c) d += q[c] * kt[c];
    s[t] = d * scale;
    mx = std::max(mx, s[t]);
  }
  float l = 0.f;
  for (int64_t t = 0; t < total; ++t) {
    s[t] = std::exp(s[t] - mx);
    l += s[t];
  }
  for (int64_t c = 0; c < hd; ++c) out[c] = 0.f;
  for (int64_t t = 0; t < total; ++t) {
    const int64_t key = t < prefix ? t : extra[t - prefix];
    const float* vt = vh + key * hd;
    const float w = s[t] / l;
    for (int64_t c = 0; c < hd; ++c) out[c] += w * vt[c];
  }
}

#ifdef MMFM_ATTN_AVX2
// exp for x <= 0 (scores minus their max), Cephes' expf: x = g ln2 + r, |r| <= ln2 / 2, a degree-5
// polynomial for e^r, 2^g through the exponent bits. Relative error ~2e-7; x < -87 gives ~0.
inline __m256 exp_le0(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  x = _mm256_max_ps(x, lo);
  __m256 g = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  g = _mm256_floor_ps(g);
  x = _mm256_fnmadd_ps(g, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(g, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(g), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 sums of 8 vectors, as one vector (lane j = the sum of p[j]).
inline __m256 hsum8(const __m256* p) {
  const __m256 a = _mm256_hadd_ps(p[0], p[1]), b = _mm256_hadd_ps(p[2], p[3]);
  const __m256 c = _mm256_hadd_ps(p[4], p[5]), d = _mm256_hadd_ps(p[6], p[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  // ab = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high halves of keys 0-3), cd likewise for 4-7
  const __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
  return _mm256_add_ps(lo, hi);
}

// C = hd / 8 vectors per row of q, k, v, out: a template parameter, so the query, the partial
// dot products and the output accumulators live in registers.
template <int C>
void one_query_avx2(const float* q, const float* kh, const float* vh, int64_t prefix, const int64_t* extra,
                    int64_t n_extra, float scale, float* s, float* out) {
  constexpr int64_t hd = 8 * C;
  __m256 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * c), _mm256_set1_ps(scale));
  const int64_t total = prefix + n_extra;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= prefix; t += 8) {          // 8 consecutive keys: 8 dot products reduced together
    __m256 p[8];
    const float* kt = kh + t * hd;
    for (int j = 0; j < 8; ++j) {
      __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kt + j * hd));
      for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kt + j * hd + 8 * c), acc);
      p[j] = acc;
    }
    const __m256 sc = hsum8(p);
    _mm256_storeu_ps(s + t, sc);
    vmax = _mm256_max_ps(vmax, sc);
  }
  float mx;
  {
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    mx = lanes[0];
    for (int j = 1; j < 8; ++j) mx = std::max(mx, lanes[j]);
  }
  for (; t < total; ++t) {                   // the last keys of the prefix, then the new block's
    const int64_t key = t < prefix ? t : extra[t - prefix];
    const float* kt = kh + key * hd;
    __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kt));
    for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kt + 8 * c), acc);
    s[t] = hsum(acc);
    mx = std::max(mx, s[t]);
  }
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 l8 = _mm256_setzero_ps();
  t = 0;
  for (; t + 8 <= total; t += 8) {
    const __m256 e = exp_le0(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
    _mm256_storeu_ps(s + t, e);
    l8 = _mm256_add_ps(l8, e);
  }
  float l = hsum(l8);
  for (; t < total; ++t) {
    s[t] = std::exp(s[t] - mx);
    l += s[t];
  }
  __m256 o[C];
  for (int c = 0; c < C; ++c) o[c] = _mm256_setzero_ps();
  for (t = 0; t < prefix; ++t) {
    const float* vt = vh + t * hd;
    const __m256 w = _mm256_set1_ps(s[t]);
    for (int c = 0; c < C; ++c) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * c), o[c]);
  }
  for (; t < total; ++t) {
    const float* vt = vh + extra[t - prefix] * hd;
    const __m256 w = _mm256_set1_ps(s[t]);
    for (int c = 0; c < C; ++c) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * c), o[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / l);
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], inv));
}

using QueryFn = void (*)(const float*, const float*, const float*, int64_t, const int64_t*, int64_t, float, float*,
                         float*);

// hd = 8, 16, ..., 128: the templated kernel; other sizes: the portable loop.
QueryFn avx2_for(int64_t hd) {
  switch (hd) {
    case 8: return &one_query_avx2<1>;
    case 16: return &one_query_avx2<2>;
    case 24: return &one_query_avx2<3>;
    case 32: return &one_query_avx2<4>;
    case 48: return &one_query_avx2<6>;
    case 64: return &one_query_avx2<8>;
    case 96: return &one_query_avx2<12>;
    case 128: return &one_query_avx2<16>;
    default: return nullptr;
  }
}
#endif

}  // namespace

void decode_attention_cpu(const float* q, int64_t qb, int64_t qn, int64_t qh, const float* k, const float* v,
                          const int64_t* prefix, const bool* mask, float* out, int64_t B, int64_t n, int64_t H,
                          int64_t Hkv, int64_t T, int64_t hd, float scale, bool generic) {
  const int64_t group = H / Hkv;
  const int64_t tasks = B * n * H;
#ifdef MMFM_ATTN_AVX2
  const QueryFn fast = generic ? nullptr : avx2_for(hd);
#else
  (void)generic;
#endif
  auto run = [&](int64_t lo, int64_t hi, float* s, int64_t* extra) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / (n * H), i = (task / H) % n, h = task % H;
      const int64_t g = h / group;
      const int64_t n_extra = visible_keys(prefix[b], n, i, mask, extra);
      const float* qp = q + b * qb + i * qn + h * qh;
      const float* kh = k + (b * Hkv + g) * T * hd;
      const float* vh = v + (b * Hkv + g) * T * hd;
      float* op = out + ((b * n + i) * H + h) * hd;
#ifdef MMFM_ATTN_AVX2
      if (fast != nullptr) {
        fast(qp, kh, vh, prefix[b], extra, n_extra, scale, s, op);
        continue;
      }
#endif
      one_query_generic(qp, kh, vh, prefix[b], extra, n_extra, hd, scale, s, op);
    }
  };
  // One (row, query, head) is ~2 hd multiply-adds per visible key: split across threads only
  // when there is enough of it to pay for the fork.
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) keys += prefix[b] + n;
  const int64_t work = keys * n * H * hd * 2;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(),
                                                                                work / 262144)));
  if (threads == 1) {
    std::vector<float> s(static_cast<size_t>(T) + 8);
    std::vector<int64_t> extra(static_cast<size_t>(n));
    run(0, tasks, s.data(), extra.data());
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(static_cast<size_t>(T) + 8);
    std::vector<int64_t> extra(static_cast<size_t>(n));
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    run(tasks * id / nt, tasks * (id + 1) / nt, s.data(), extra.data());
  }
}

}  // namespace attention
}  // namespace mmfm
