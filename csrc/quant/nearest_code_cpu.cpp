// Nearest-code search on the CPU: blocked GEMM-style micro-kernel with a fused running
// minimum (see code_search.h for the layout). Rows are split over OpenMP threads; each
// thread walks the codebook in L2-sized blocks of panels, so a block is reused by all
// the thread's micro-tiles before the next block is read.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "quant/code_search.h"
#include "quant/quant_common.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

constexpr int64_t kChunkRows = kRows * 16;         // rows per OpenMP work item
constexpr int64_t kBlockBytes = 512 * 1024;        // packed codebook bytes per cache block

int64_t panels_per_block(int64_t D) {
  return std::max<int64_t>(1, kBlockBytes / (D * kPanel * int64_t(sizeof(float))));
}

// acc[r][j] = z_r . e_j for the kRows rows at z and the panel at p.
inline void dot_tile(const float* __restrict z, int64_t D, const float* __restrict p, float acc[kRows][kPanel]) {
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kPanel; ++j) acc[r][j] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float* __restrict pd = p + d * kPanel;
    for (int r = 0; r < kRows; ++r) {
      const float a = z[r * D + d];
#pragma omp simd
      for (int j = 0; j < kPanel; ++j) acc[r][j] += a * pd[j];
    }
  }
}

// One micro-tile against panels [p0, p1): lane-wise running minimum. Lane j sees codes in
// increasing index order, and a strict < keeps the first of equal scores.
void tile_top1(const float* __restrict z, int64_t D, const PackedCodebook& pk, int64_t p0, int64_t p1,
               float lane_val[kRows][kPanel], int32_t lane_idx[kRows][kPanel]) {
  float acc[kRows][kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    dot_tile(z, D, pk.data.data() + p * D * kPanel, acc);
    const float* __restrict nrm = pk.norm.data() + p * kPanel;
    const int32_t base = static_cast<int32_t>(p * kPanel);
    for (int r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int j = 0; j < kPanel; ++j) {
        const float s = nrm[j] - 2.f * acc[r][j];
        const bool better = s < lane_val[r][j];
        lane_val[r][j] = better ? s : lane_val[r][j];
        lane_idx[r][j] = better ? base + j : lane_idx[r][j];
      }
    }
  }
}

}  // namespace

void pack_codebook(const void* codebook, DType dt, int64_t K, int64_t D, bool normalise, PackedCodebook& out) {
  out.K = K;
  out.D = D;
  out.panels = (K + kPanel - 1) / kPanel;
  out.data.assign(out.panels * D * kPanel, 0.f);
  out.norm.assign(out.panels * kPanel, std::numeric_limits<float>::infinity());
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    const int64_t p = k / kPanel, j = k % kPanel;
    float* dst = out.data.data() + p * D * kPanel + j;
    float scale = 1.f;
    if (normalise) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = load_as_float(codebook, dt, k * D + d);
        ss += v * v;
      }
      scale = 1.f / std::max(std::sqrt(ss), 1e-12f);
    }
    float n = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = load_as_float(codebook, dt, k * D + d) * scale;
      dst[d * kPanel] = v;
      n += v * v;
    }
    out.norm[k] = n;
  }
}

void load_rows(const void* z, DType dt, int64_t first, int64_t rows, int64_t D, bool normalise, int64_t rows_padded,
               float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = load_as_float(z, dt, (first + r) * D + d);
    if (normalise) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += dst[d] * dst[d];
      const float scale = 1.f / std::max(std::sqrt(ss), 1e-12f);
      for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
    }
  }
  std::fill(out + rows * D, out + rows_padded * D, 0.f);
}

void search_top1(const float* rows, int64_t nrows, const PackedCodebook& pk, float* best_score, int64_t* best_idx) {
  const int64_t D = pk.D, tiles = nrows / kRows, step = panels_per_block(D);
  std::vector<float> lane_val(tiles * kRows * kPanel, std::numeric_limits<float>::infinity());
  std::vector<int32_t> lane_idx(tiles * kRows * kPanel, 0);
  for (int64_t p0 = 0; p0 < pk.panels; p0 += step) {
    const int64_t p1 = std::min(pk.panels, p0 + step);
    for (int64_t t = 0; t < tiles; ++t) {
      auto* lv = reinterpret_cast<float(*)[kPanel]>(lane_val.data() + t * kRows * kPanel);
      auto* li = reinterpret_cast<int32_t(*)[kPanel]>(lane_idx.data() + t * kRows * kPanel);
      tile_top1(rows + t * kRows * D, D, pk, p0, p1, lv, li);
    }
  }
  // Fold the lanes: smallest score, lowest index among equals.
  for (int64_t r = 0; r < tiles * kRows; ++r) {
    const float* lv = lane_val.data() + r * kPanel;
    const int32_t* li = lane_idx.data() + r * kPanel;
    float bv = lv[0];
    int32_t bi = li[0];
    for (int j = 1; j < kPanel; ++j)
      if (lv[j] < bv || (lv[j] == bv && li[j] < bi)) {
        bv = lv[j];
        bi = li[j];
      }
    best_score[r] = bv;
    best_idx[r] = bi;
  }
}

void search_topk(const float* rows, int64_t nrows, const PackedCodebook& pk, int64_t topk, float* best_score,
                 int64_t* best_idx) {
  const int64_t D = pk.D, tiles = nrows / kRows, step = panels_per_block(D);
  std::fill(best_score, best_score + nrows * topk, std::numeric_limits<float>::infinity());
  std::fill(best_idx, best_idx + nrows * topk, int64_t(0));
  float acc[kRows][kPanel];
  for (int64_t p0 = 0; p0 < pk.panels; p0 += step) {
    const int64_t p1 = std::min(pk.panels, p0 + step);
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t p = p0; p < p1; ++p) {
        dot_tile(rows + t * kRows * D, D, pk.data.data() + p * D * kPanel, acc);
        const float* nrm = pk.norm.data() + p * kPanel;
        for (int r = 0; r < kRows; ++r) {
          const int64_t row = t * kRows + r;
          for (int j = 0; j < kPanel; ++j) {
            const int64_t code = p * kPanel + j;
            if (code >= pk.K) break;
            insert_sorted(best_score + row * topk, best_idx + row * topk, topk, nrm[j] - 2.f * acc[r][j], code);
          }
        }
      }
    }
  }
}

void nearest_code_cpu(const void* z, const void* codebook, DType dt, int64_t N, int64_t K, int64_t D,
                      int64_t topk, bool cosine, int64_t* idx, float* dist) {
  PackedCodebook pk;
  pack_codebook(codebook, dt, K, D, cosine, pk);
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
#pragma omp parallel
  {
    std::vector<float> rows(kChunkRows * D), score(kChunkRows * topk);
    std::vector<int64_t> best(kChunkRows * topk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kChunkRows, n = std::min(kChunkRows, N - first);
      const int64_t padded = (n + kRows - 1) / kRows * kRows;
      load_rows(z, dt, first, n, D, cosine, padded, rows.data());
      if (topk == 1)
        search_top1(rows.data(), padded, pk, score.data(), best.data());
      else
        search_topk(rows.data(), padded, pk, topk, score.data(), best.data());
      for (int64_t r = 0; r < n; ++r) {
        const float* zr = rows.data() + r * D;
        float zn = 0.f;
        for (int64_t d = 0; d < D; ++d) zn += zr[d] * zr[d];
        for (int64_t t = 0; t < topk; ++t) {
          idx[(first + r) * topk + t] = best[r * topk + t];
          dist[(first + r) * topk + t] = std::max(0.f, zn + score[r * topk + t]);
        }
      }
    }
  }
}

}  // namespace quant
}  // namespace mmfm
