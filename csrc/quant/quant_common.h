// Pieces of the quantization kernels that the CPU and CUDA versions share verbatim (MMFM_HD:
// one definition for both compilers), so that both keep the same tie order and produce the
// same integers. No torch headers.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace mmfm {
namespace quant {

// Inserts (s, j) into the ascending list (val, idx) of length k. Every index already in the
// list is smaller than j (codes are visited in increasing order), so an equal score goes
// behind the earlier index (strict <). Len: the CPU kernel counts in int64_t, the CUDA
// kernel in int (registers).
template <class Len>
MMFM_HD void insert_sorted(float* val, int64_t* idx, Len k, float s, int64_t j) {
  if (!(s < val[k - 1])) return;
  Len pos = k - 1;
  while (pos > 0 && s < val[pos - 1]) {
    val[pos] = val[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  val[pos] = s;
  idx[pos] = j;
}

// LFQ sign quantization of row n of z [N, d]: codes[n, i] = +1 if z > 0 else -1; returns the
// row's index, bit i = code i is +1.
MMFM_HD int64_t lfq_quantize_row(const void* z, DType dt, int64_t n, int64_t d, float* codes) {
  int64_t index = 0;
  for (int64_t i = 0; i < d; ++i) {
    const bool on = load_as_float(z, dt, n * d + i) > 0.f;
    codes[n * d + i] = on ? 1.f : -1.f;
    index |= static_cast<int64_t>(on) << i;
  }
  return index;
}

// Code i (+1 or -1) of an LFQ index.
MMFM_HD float lfq_bit_code(int64_t index, int64_t i) { return ((index >> i) & 1) ? 1.f : -1.f; }

}  // namespace quant
}  // namespace mmfm
