// Finite scalar quantization on the CPU (Mentzer et al., FSQ). See quant_kernels.h for the
// exact formulas; the reference in mmfm/ops/quant.py spells out the same steps in torch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

struct Level {
  float half_l, offset, shift;
  int64_t half_width, radix;
};

std::vector<Level> prepare(const int64_t* levels, int64_t C) {
  std::vector<Level> out(C);
  int64_t radix = 1;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t L = levels[c];
    Level& lv = out[c];
    lv.half_l = (L - 1) * (1.f + 1e-3f) / 2.f;
    lv.offset = (L % 2 == 0) ? 0.5f : 0.f;
    lv.shift = std::atanh(lv.offset / lv.half_l);
    lv.half_width = L / 2;
    lv.radix = radix;
    radix *= L;
  }
  return out;
}

}  // namespace

void fsq_quantize_cpu(const void* z, DType dt, const int64_t* levels, int64_t N, int64_t C, float* codes,
                      int64_t* idx) {
  const std::vector<Level> lv = prepare(levels, C);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    int64_t index = 0;
    for (int64_t c = 0; c < C; ++c) {
      const Level& l = lv[c];
      const float bounded = std::tanh(load_as_float(z, dt, n * C + c) + l.shift) * l.half_l - l.offset;
      const float q = std::nearbyint(bounded);  // round half to even, as torch.round
      codes[n * C + c] = q / static_cast<float>(l.half_width);
      index += (static_cast<int64_t>(q) + l.half_width) * l.radix;
    }
    idx[n] = index;
  }
}

void fsq_indices_to_codes_cpu(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes) {
  const std::vector<Level> lv = prepare(levels, C);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t digit = (idx[n] / lv[c].radix) % levels[c];
      codes[n * C + c] = static_cast<float>(digit - lv[c].half_width) / static_cast<float>(lv[c].half_width);
    }
  }
}

void fsq_codes_to_indices_cpu(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx) {
  const std::vector<Level> lv = prepare(levels, C);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    int64_t index = 0;
    for (int64_t c = 0; c < C; ++c) {
      int64_t digit = static_cast<int64_t>(std::nearbyint(codes[n * C + c] * lv[c].half_width)) + lv[c].half_width;
      digit = std::min<int64_t>(std::max<int64_t>(digit, 0), levels[c] - 1);  // off-grid codes snap to the edge
      index += digit * lv[c].radix;
    }
    idx[n] = index;
  }
}

}  // namespace quant
}  // namespace mmfm
