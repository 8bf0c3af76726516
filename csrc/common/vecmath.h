// Branch-free float math that the compiler vectorises inside `#pragma omp simd` loops
// (libm's expf/tanhf are scalar calls unless the whole build uses -ffast-math, which would
// change every kernel's rounding). The exp core is shared with the CUDA kernels (MMFM_HD).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace mmfm {

// ---- exp core: Cody-Waite range reduction and Cephes' expf polynomial -----------------------
// exp(x) = 2^n exp(r) with n = round(x / ln 2), r = x - n ln 2, |r| <= ln2 / 2, and
// exp(r) ~ 1 + r + r^2 expf_poly(r) (about 1 ulp). Callers pick how n is rounded, how the last
// step is formed and how 2^n is applied, for their input range (vexpf, sampling's exp_weight).
// ln 2 is split in two so that n * ln2_hi is exact (ln2_hi has 9 significant bits).
MMFM_HD float expf_reduce(float x, float n) {
  const float r = x - n * 0.693359375f;
  return r + n * 2.12194440e-4f;
}

MMFM_HD float expf_poly(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p;
}

// exp(x) for float, max error about 2 ulp on [-87, 88]; saturates outside (0 and +inf-ish).
inline float vexpf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  const float r = expf_reduce(x, n);
  const float p = expf_poly(r) * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>((static_cast<int32_t>(n) + 127) << 23));  // 2^n
  return p * scale;
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|): no cancellation for large |x|.
inline float vtanhf(float x) {
  const float ax = x < 0.f ? -x : x;
  const float e = vexpf(-2.f * ax);
  const float t = (1.f - e) / (1.f + e);
  return x < 0.f ? -t : t;
}

}  // namespace mmfm
