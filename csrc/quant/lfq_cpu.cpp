// Lookup-free quantization (binary latents) on the CPU: sign quantization, bit packing and
// the entropy penalty. The penalty's exact codebook entropy enumerates the 2^d codes per
// sample by repeated doubling (P(c) for all c in 2^d multiplications), never the N x 2^d
// matrix; per-thread partial sums are folded in thread order.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant/quant_common.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

inline float softplus(float x) { return x > 0.f ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
// Binary entropy of sigmoid(s), stable for large |s|.
inline float binary_entropy_logit(float s) {
  const float p = sigmoid(s);
  return p * softplus(-s) + (1.f - p) * softplus(s);
}
inline float binary_entropy(float p) {
  float h = 0.f;
  if (p > 0.f) h -= p * std::log(p);
  if (p < 1.f) h -= (1.f - p) * std::log(1.f - p);
  return h;
}

// P[c] = prod_i (bit_i(c) ? p_i : 1 - p_i) for the 2^d codes c.
void code_probs(const float* p, int64_t d, float* P) {
  P[0] = 1.f;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t half = int64_t(1) << i;
    for (int64_t c = 0; c < half; ++c) {
      P[c + half] = P[c] * p[i];
      P[c] *= 1.f - p[i];
    }
  }
}

// mean over samples of P_n(c), exact enumeration.
std::vector<double> mean_code_probs(const float* z, int64_t N, int64_t d, float tau) {
  const int64_t C = int64_t(1) << d;
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    std::vector<float> p(d), P(C);
    double* acc = partial.data() + static_cast<size_t>(t) * C;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < d; ++i) p[i] = sigmoid(4.f * z[n * d + i] / tau);
      code_probs(p.data(), d, P.data());
      for (int64_t c = 0; c < C; ++c) acc[c] += P[c];
    }
  }
  std::vector<double> mean(C, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) mean[c] += partial[static_cast<size_t>(t) * C + c];
  for (auto& m : mean) m /= static_cast<double>(N);
  return mean;
}

// Per-bit mean probabilities (factorised form).
std::vector<double> mean_bit_probs(const float* z, int64_t N, int64_t d, float tau) {
  std::vector<double> m(d, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < d; ++i) m[i] += sigmoid(4.f * z[n * d + i] / tau);
  for (auto& v : m) v /= static_cast<double>(N);
  return m;
}

}  // namespace

void lfq_quantize_cpu(const void* z, DType dt, int64_t N, int64_t d, float* codes, int64_t* idx) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) idx[n] = lfq_quantize_row(z, dt, n, d, codes);
}

void lfq_indices_to_codes_cpu(const int64_t* idx, int64_t N, int64_t d, float* codes) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < d; ++i) codes[n * d + i] = lfq_bit_code(idx[n], i);
}

void lfq_entropy_cpu(const float* z, int64_t N, int64_t d, float tau, bool exact, float* out) {
  double sample = 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < d; ++i) sample += binary_entropy_logit(4.f * z[n * d + i] / tau);
  out[0] = static_cast<float>(sample / static_cast<double>(N));

  double codebook = 0.0;
  if (exact) {
    for (double a : mean_code_probs(z, N, d, tau))
      if (a > 0.0) codebook -= a * std::log(a);
  } else {
    for (double m : mean_bit_probs(z, N, d, tau)) codebook += binary_entropy(static_cast<float>(m));
  }
  out[1] = static_cast<float>(codebook);
}

void lfq_entropy_backward_cpu(const float* z, int64_t N, int64_t d, float tau, bool exact, const float* g,
                              float* grad_z) {
  const float g0 = g[0], g1 = g[1], ds_dz = 4.f / tau, invN = 1.f / static_cast<float>(N);
  // d/ds of Hb(sigmoid(s)) = -s * sigmoid'(s).
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < N * d; ++k) {
    const float s = 4.f * z[k] / tau, p = sigmoid(s);
    grad_z[k] = g0 * (-s * p * (1.f - p)) * invN * ds_dz;
  }
  if (g1 == 0.f) return;
  if (!exact) {
    // H = sum_i Hb(m_i), m_i = mean_n p_ni; dHb/dm = log((1 - m) / m).
    const std::vector<double> m = mean_bit_probs(z, N, d, tau);
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < N * d; ++k) {
      const int64_t i = k % d;
      const float s = 4.f * z[k] / tau, p = sigmoid(s);
      const double mi = std::min(std::max(m[i], 1e-12), 1.0 - 1e-12);
      grad_z[k] += g1 * static_cast<float>(std::log((1.0 - mi) / mi)) * p * (1.f - p) * invN * ds_dz;
    }
    return;
  }
  // H = -sum_c a_c log a_c, a_c = mean_n P_n(c). dH/dP_n(c) = -(log a_c + 1) / N =: w_c, and
  // dP_n(c)/ds_ni = P_n(c) (bit_i(c) - p_ni), so dH/ds_ni = sum_c w_c P_n(c) bit_i(c) - p_ni sum_c w_c P_n(c).
  const int64_t C = int64_t(1) << d;
  const std::vector<double> a = mean_code_probs(z, N, d, tau);
  std::vector<float> w(C);
  for (int64_t c = 0; c < C; ++c) w[c] = a[c] > 0.0 ? static_cast<float>(-(std::log(a[c]) + 1.0)) * invN : 0.f;
#pragma omp parallel
  {
    std::vector<float> p(d), P(C);
    std::vector<double> on(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < d; ++i) p[i] = sigmoid(4.f * z[n * d + i] / tau);
      code_probs(p.data(), d, P.data());
      double total = 0.0;
      std::fill(on.begin(), on.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(w[c]) * P[c];
        total += v;
        for (int64_t i = 0; i < d; ++i)
          if ((c >> i) & 1) on[i] += v;
      }
      for (int64_t i = 0; i < d; ++i)
        grad_z[n * d + i] += g1 * static_cast<float>(on[i] - p[i] * total) * ds_dz;
    }
  }
}

}  // namespace quant
}  // namespace mmfm
