// Residual VQ on the CPU: M levels of nearest-code search on the running residual in one
// call. Each OpenMP work item keeps its rows' residual in fp32 across the levels, so the
// input is read once and no per-level tensors are allocated.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "quant/code_search.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {

void residual_vq_cpu(const void* z, const void* codebooks, DType dt, int64_t N, int64_t M, int64_t K, int64_t D,
                     int64_t* idx, float* quantized, float* residual_norm) {
  const size_t elem = dt == DType::F32 ? sizeof(float) : sizeof(uint16_t);
  std::vector<PackedCodebook> packed(M);
  for (int64_t m = 0; m < M; ++m)
    pack_codebook(static_cast<const char*>(codebooks) + m * K * D * elem, dt, K, D, false, packed[m]);

  constexpr int64_t chunk = kRows * 16;
  const int64_t chunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    std::vector<float> res(chunk * D), score(chunk);
    std::vector<int64_t> best(chunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * chunk, n = std::min(chunk, N - first);
      const int64_t padded = (n + kRows - 1) / kRows * kRows;
      load_rows(z, dt, first, n, D, false, padded, res.data());
      std::fill(quantized + first * D, quantized + (first + n) * D, 0.f);
      for (int64_t m = 0; m < M; ++m) {
        const PackedCodebook& pk = packed[m];
        search_top1(res.data(), padded, pk, score.data(), best.data());
        for (int64_t r = 0; r < n; ++r) {
          const int64_t k = best[r];
          const float* e = pk.data.data() + (k / kPanel) * D * kPanel + (k % kPanel);
          float* rr = res.data() + r * D;
          float* q = quantized + (first + r) * D;
          float rn = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            rr[d] -= e[d * kPanel];
            q[d] += e[d * kPanel];
            rn += rr[d] * rr[d];
          }
          idx[(first + r) * M + m] = k;
          residual_norm[(first + r) * M + m] = rn;
        }
      }
    }
  }
}

}  // namespace quant
}  // namespace mmfm
