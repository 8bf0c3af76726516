// EMA codebook statistics on the CPU.
//
// code_stats: a counting sort of the rows by code (serial, O(N)), then each code sums its
// own rows in row order in parallel. The summation order depends only on the data, so the
// result is bit-identical for any thread count (a parallel scatter-add with atomics or
// per-thread partials would not be).
#include <omp.h>

#include <vector>

#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {

void code_stats_cpu(const void* z, DType dt, const int64_t* idx, int64_t N, int64_t K, int64_t D, float* sums,
                    float* counts) {
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) ++start[idx[n] + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<int64_t> order(N), fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) order[fill[idx[n]]++] = n;

#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t k = 0; k < K; ++k) {
    float* s = sums + k * D;
    for (int64_t d = 0; d < D; ++d) s[d] = 0.f;
    if (dt == DType::F32) {  // the common case: a plain float row, so the inner loop vectorises
      const float* zf = static_cast<const float*>(z);
      for (int64_t i = start[k]; i < start[k + 1]; ++i) {
        const float* row = zf + order[i] * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) s[d] += row[d];
      }
    } else {
      for (int64_t i = start[k]; i < start[k + 1]; ++i) {
        const int64_t n = order[i];
        for (int64_t d = 0; d < D; ++d) s[d] += load_as_float(z, dt, n * D + d);
      }
    }
    counts[k] = static_cast<float>(start[k + 1] - start[k]);
  }
}

void ema_update_cpu(const float* size, const float* embed_sum, const float* counts, const float* sums, int64_t K,
                    int64_t D, float decay, float eps, float dead_threshold, float* new_size, float* new_sum,
                    float* codebook, bool* dead) {
  // The total is a serial sum so that it, too, does not depend on the thread count.
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    new_size[k] = decay * size[k] + (1.f - decay) * counts[k];
    total += new_size[k];
    dead[k] = new_size[k] < dead_threshold;
  }
  const float n = static_cast<float>(total);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    const float smoothed = (new_size[k] + eps) / (n + K * eps) * n;
    for (int64_t d = 0; d < D; ++d) {
      const float v = decay * embed_sum[k * D + d] + (1.f - decay) * sums[k * D + d];
      new_sum[k * D + d] = v;
      codebook[k * D + d] = v / smoothed;
    }
  }
}

}  // namespace quant
}  // namespace mmfm
