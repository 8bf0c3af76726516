// Finite-value check for the bindings' argument validation. at::isfinite(t).all() builds a
// bool tensor and costs more than some of the ops it guards (0.7 ms for 16384 x 32 floats on
// 2 cores, against 0.2 ms for code_stats itself); this reads the exponent bits in one
// vectorised, parallel pass.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace mmfm {

bool all_finite_cpu(const void* data, DType dt, int64_t n) {
  int bad = 0;
  if (dt == DType::F32) {
    const uint32_t* p = static_cast<const uint32_t*>(data);
#pragma omp parallel for simd reduction(| : bad) schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) bad |= (p[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(data);
    const uint16_t mask = dt == DType::BF16 ? 0x7f80u : 0x7c00u;  // all-ones exponent: inf or nan
#pragma omp parallel for simd reduction(| : bad) schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) bad |= (p[i] & mask) == mask;
  }
  return bad == 0;
}

}  // namespace mmfm
