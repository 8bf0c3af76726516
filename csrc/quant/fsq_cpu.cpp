// Finite scalar quantization on the CPU (Mentzer et al., FSQ). See quant_kernels.h for the
// exact formulas; the reference in mmfm/ops/quant.py spells out the same steps in torch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/vecmath.h"
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
  // The per-channel constants repeat every C elements, so over a tile of kLanes * C elements
  // (a whole number of rows) they form a fixed pattern: the element loop needs no modulo and
  // vectorises, tanh included (vtanhf).
  constexpr int64_t kLanes = 16;
  const int64_t tile = kLanes * C;
  std::vector<float> shift(tile), half_l(tile), offset(tile), inv_hw(tile);
  for (int64_t j = 0; j < tile; ++j) {
    const Level& l = lv[j % C];
    shift[j] = l.shift;
    half_l[j] = l.half_l;
    offset[j] = l.offset;
    inv_hw[j] = 1.f / static_cast<float>(l.half_width);
  }
  const int64_t tiles = (N + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    std::vector<float> x(tile);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t row0 = t * kLanes, rows = std::min(kLanes, N - row0), count = rows * C;
      for (int64_t j = 0; j < count; ++j) x[j] = load_as_float(z, dt, row0 * C + j);
      float* out = codes + row0 * C;
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        const float bounded = vtanhf(x[j] + shift[j]) * half_l[j] - offset[j];
        out[j] = __builtin_rintf(bounded) * inv_hw[j];  // round half to even, as torch.round
      }
      for (int64_t r = 0; r < rows; ++r) {
        int64_t index = 0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t q = static_cast<int64_t>(__builtin_rintf(out[r * C + c] * lv[c].half_width));
          index += (q + lv[c].half_width) * lv[c].radix;
        }
        idx[row0 + r] = index;
      }
    }
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
