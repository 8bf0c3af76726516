// CPU building blocks of nearest-code search, shared by nearest_code_cpu.cpp and
// residual_vq_cpu.cpp.
//
// The codebook is repacked into panels of kPanel codes laid out [D][kPanel], so that the
// inner loop is an outer product (one broadcast row value times one panel row) that the
// compiler keeps in vector registers: a blocked GEMM micro-kernel whose epilogue folds the
// scores into a running minimum instead of storing them. Memory beyond the inputs is the
// packed codebook (K x D) and a few rows of state: never N x K.
#pragma once
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace mmfm {
namespace quant {

constexpr int kPanel = 16;  // codes per panel: one AVX-512 vector, two AVX2 vectors
constexpr int kRows = 6;    // rows per micro-tile: 6 x 16 accumulators fit the register file

struct PackedCodebook {
  int64_t K = 0, D = 0, panels = 0;
  std::vector<float> data;  // [panels][D][kPanel]
  std::vector<float> norm;  // [panels * kPanel]; +inf for padding codes so they never win
};

// Packs rows [0, K) of a [K, D] buffer of type dt (l2-normalised when `normalise`).
void pack_codebook(const void* codebook, DType dt, int64_t K, int64_t D, bool normalise, PackedCodebook& out);

// Converts `rows` rows of a [*, D] buffer (starting at row `first`) to fp32 into `out`
// ([rows_padded, D], padding rows zero), l2-normalised when `normalise`.
void load_rows(const void* z, DType dt, int64_t first, int64_t rows, int64_t D, bool normalise, int64_t rows_padded,
               float* out);

// For `rows` fp32 rows (rows a multiple of kRows), writes per row the minimum over codes of
// score = ||e||^2 - 2 z.e and its index (lowest on ties).
void search_top1(const float* rows, int64_t nrows, const PackedCodebook& pk, float* best_score, int64_t* best_idx);

// Same with the `topk` smallest scores per row, ascending, ties by lowest index.
void search_topk(const float* rows, int64_t nrows, const PackedCodebook& pk, int64_t topk, float* best_score,
                 int64_t* best_idx);

}  // namespace quant
}  // namespace mmfm
