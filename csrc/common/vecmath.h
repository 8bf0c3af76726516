// Branch-free float math that the compiler vectorises inside `#pragma omp simd` loops
// (libm's expf/tanhf are scalar calls unless the whole build uses -ffast-math, which would
// change every kernel's rounding).
#pragma once
#include <cstdint>
#include <cstring>

namespace mmfm {

// exp(x) for float, max error about 2 ulp on [-87, 88]; saturates outside (0 and +inf-ish).
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6 polynomial.
inline float vexpf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;  // ln2 split in two so n * ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
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
