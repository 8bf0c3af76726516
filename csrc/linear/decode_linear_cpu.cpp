// y = residual + s * (x @ W) for the few rows of a decode step or a draft tree.
//
// Why not torch.mm: for 1-20 rows against a weight that lives in DRAM (a model's layers do not
// stay in cache between steps), the CPU BLAS reads W more than once (a [out, in] GEMV walks
// rows with poor prefetch; a GEMM with few rows packs W on every call). Measured on the
// project's 2-core EPYC (docs/benchmarks.md, "decode_linear"): [1, 192] x [192, 1024] took
// ~100 us through F.linear's layout and ~33 us here. W is packed once, when the decode step is
// built, into 16-column panels; each panel (in x 16 floats) is streamed once and stays in L1
// while every block of rows is multiplied against it, so memory traffic is one read of W.
//
// The micro-kernel holds R rows x 16 columns of accumulators in registers (2 ymm per row):
// R = 12 where AVX-512VL gives 32 vector registers, 6 with plain AVX2 (16 registers). Builds
// without AVX2 + FMA (or generic = true) run a portable loop the compiler vectorises.
#include "linear/linear_kernels.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>
#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MMFM_LINEAR_AVX2 1
#if defined(__AVX512VL__)
#define MMFM_LINEAR_ROWS 12
#else
#define MMFM_LINEAR_ROWS 6
#endif
#endif

namespace mmfm {
namespace linear {
namespace {

// Row r's output columns [j0, j0 + cols) from its 16 accumulated sums.
inline void store_row(const float* acc, int cols, float scale, const float* res, float* y) {
  if (res != nullptr) {
    for (int c = 0; c < cols; ++c) y[c] = res[c] + scale * acc[c];
  } else {
    for (int c = 0; c < cols; ++c) y[c] = scale * acc[c];
  }
}

void panel_generic(const float* x, int64_t n, int64_t in, const float* P, int cols, const float* s,
                   const float* residual, float* y, int64_t out) {
  for (int64_t r = 0; r < n; ++r) {
    float acc[kPanel] = {0.f};
    const float* xr = x + r * in;
    for (int64_t k = 0; k < in; ++k) {
      const float xv = xr[k];
      const float* w = P + k * kPanel;
      for (int c = 0; c < kPanel; ++c) acc[c] += xv * w[c];
    }
    store_row(acc, cols, s[r], residual ? residual + r * out : nullptr, y + r * out);
  }
}

#ifdef MMFM_LINEAR_AVX2
// Named accumulators rather than an array: GCC keeps an array of __m256 on the stack and
// stores it every iteration (measured 2x slower).
#define MMFM_ROW(i)                                                  \
  if constexpr (R > i) {                                             \
    const __m256 b = _mm256_broadcast_ss(x + i * in + k);            \
    c##i##a = _mm256_fmadd_ps(b, w0, c##i##a);                       \
    c##i##b = _mm256_fmadd_ps(b, w1, c##i##b);                       \
  }
#define MMFM_STORE(i)                                                \
  if constexpr (R > i) {                                             \
    float acc[kPanel];                                               \
    _mm256_storeu_ps(acc, c##i##a);                                  \
    _mm256_storeu_ps(acc + 8, c##i##b);                              \
    store_row(acc, cols, s[i], residual ? residual + i * out : nullptr, y + i * out); \
  }

// One or two rows: too few accumulators to hide the FMA latency (each one waits ~4 cycles on its
// previous sum), so the k loop keeps 4 (one row) or 2 (two rows) sets of partial sums.
template <int R>
void micro_few(const float* x, int64_t in, const float* P, int cols, const float* s, const float* residual, float* y,
               int64_t out) {
  constexpr int U = R == 1 ? 4 : 2;
  __m256 a[R][U][2];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) a[r][u][0] = a[r][u][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= in; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256 w0 = _mm256_loadu_ps(P + (k + u) * kPanel);
      const __m256 w1 = _mm256_loadu_ps(P + (k + u) * kPanel + 8);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(x + r * in + k + u);
        a[r][u][0] = _mm256_fmadd_ps(b, w0, a[r][u][0]);
        a[r][u][1] = _mm256_fmadd_ps(b, w1, a[r][u][1]);
      }
    }
  }
  for (; k < in; ++k) {
    const __m256 w0 = _mm256_loadu_ps(P + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(P + k * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * in + k);
      a[r][0][0] = _mm256_fmadd_ps(b, w0, a[r][0][0]);
      a[r][0][1] = _mm256_fmadd_ps(b, w1, a[r][0][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 lo = a[r][0][0], hi = a[r][0][1];
    for (int u = 1; u < U; ++u) {
      lo = _mm256_add_ps(lo, a[r][u][0]);
      hi = _mm256_add_ps(hi, a[r][u][1]);
    }
    float acc[kPanel];
    _mm256_storeu_ps(acc, lo);
    _mm256_storeu_ps(acc + 8, hi);
    store_row(acc, cols, s[r], residual ? residual + r * out : nullptr, y + r * out);
  }
}

template <int R>
void micro(const float* x, int64_t in, const float* P, int cols, const float* s, const float* residual, float* y,
           int64_t out) {
  if constexpr (R <= 2) {
    micro_few<R>(x, in, P, cols, s, residual, y, out);
    return;
  }
  __m256 c0a = _mm256_setzero_ps(), c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a, c3a = c0a, c3b = c0a,
         c4a = c0a, c4b = c0a, c5a = c0a, c5b = c0a;
#if MMFM_LINEAR_ROWS > 6
  __m256 c6a = c0a, c6b = c0a, c7a = c0a, c7b = c0a, c8a = c0a, c8b = c0a, c9a = c0a, c9b = c0a, c10a = c0a,
         c10b = c0a, c11a = c0a, c11b = c0a;
#endif
  for (int64_t k = 0; k < in; ++k) {
    const __m256 w0 = _mm256_loadu_ps(P + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(P + k * kPanel + 8);
    MMFM_ROW(0) MMFM_ROW(1) MMFM_ROW(2) MMFM_ROW(3) MMFM_ROW(4) MMFM_ROW(5)
#if MMFM_LINEAR_ROWS > 6
    MMFM_ROW(6) MMFM_ROW(7) MMFM_ROW(8) MMFM_ROW(9) MMFM_ROW(10) MMFM_ROW(11)
#endif
  }
  MMFM_STORE(0) MMFM_STORE(1) MMFM_STORE(2) MMFM_STORE(3) MMFM_STORE(4) MMFM_STORE(5)
#if MMFM_LINEAR_ROWS > 6
  MMFM_STORE(6) MMFM_STORE(7) MMFM_STORE(8) MMFM_STORE(9) MMFM_STORE(10) MMFM_STORE(11)
#endif
}
#undef MMFM_ROW
#undef MMFM_STORE

using Micro = void (*)(const float*, int64_t, const float*, int, const float*, const float*, float*, int64_t);

template <int... Rs>
constexpr auto micro_table(std::integer_sequence<int, Rs...>) {
  return std::array<Micro, sizeof...(Rs)>{&micro<Rs + 1>...};
}

void panel_avx2(const float* x, int64_t n, int64_t in, const float* P, int cols, const float* s,
                const float* residual, float* y, int64_t out) {
  static constexpr auto table = micro_table(std::make_integer_sequence<int, MMFM_LINEAR_ROWS>{});
  // Blocks as even as possible (20 rows at 12: 10 + 10, not 12 + 8): the same passes over
  // the panel, fewer idle accumulators.
  const int64_t blocks = (n + MMFM_LINEAR_ROWS - 1) / MMFM_LINEAR_ROWS;
  int64_t r = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t rows = (n - r) / (blocks - b) + ((n - r) % (blocks - b) != 0);
    table[rows - 1](x + r * in, in, P, cols, s + r, residual ? residual + r * out : nullptr, y + r * out, out);
    r += rows;
  }
}
#endif

}  // namespace

const char* decode_linear_isa() {
#ifdef MMFM_LINEAR_AVX2
  return MMFM_LINEAR_ROWS > 6 ? "avx2-fma x12" : "avx2-fma x6";
#else
  return "generic";
#endif
}

void decode_linear_cpu(const float* x, int64_t n, int64_t in, const float* packed, int64_t out, bool has_rms,
                       float rms_add, const float* residual, float* y, bool generic) {
  if (n == 0 || out == 0) return;
  std::vector<float> s(static_cast<size_t>(n), 1.f);
  if (has_rms) {
    for (int64_t r = 0; r < n; ++r) {
      double ss = 0.0;  // the reference's fp32 sum differs only in the last bits
      for (int64_t k = 0; k < in; ++k) ss += static_cast<double>(x[r * in + k]) * x[r * in + k];
      s[r] = static_cast<float>(1.0 / std::sqrt(ss + static_cast<double>(rms_add)));
    }
  }
  const int64_t panels = (out + kPanel - 1) / kPanel;
  // Threads (OpenMP: torch.set_num_threads sets its count) split the panels; below ~64 K
  // multiply-adds per thread the fork costs more than it saves.
  const int64_t work = n * in * kPanel;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(),
                                                                                panels * work / 65536)));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, out - p * kPanel));
    const float* P = packed + p * in * kPanel;
    const float* res = residual ? residual + p * kPanel : nullptr;
    float* yp = y + p * kPanel;
#ifdef MMFM_LINEAR_AVX2
    if (!generic) {
      panel_avx2(x, n, in, P, cols, s.data(), res, yp, out);
      continue;
    }
#endif
    panel_generic(x, n, in, P, cols, s.data(), res, yp, out);
  }
}

}  // namespace linear
}  // namespace mmfm
