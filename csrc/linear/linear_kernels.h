// Decode-time linear layers on the CPU: y = residual + s * (x @ W) for a few rows x (one
// decode step, or one draft tree of up to a few dozen nodes), W packed once into panels of
// 16 output columns so each panel is one sequential stream read from memory once per call.
// Raw pointers only; the binding (linear_binding.cpp) checks arguments.
#pragma once
#include <cstdint>

namespace mmfm {
namespace linear {

constexpr int64_t kPanel = 16;  // output columns per panel; packed[p][k][c] = W[k][p * 16 + c]

// x [n, in] row-major; packed [ceil(out / 16), in, 16] (zero-padded columns); y [n, out];
// residual [n, out] or nullptr. When has_rms, row r is scaled by 1 / sqrt(sum_k x[r,k]^2 + rms_add).
// generic = use the portable loop even where the AVX2 micro-kernel was compiled (for tests).
void decode_linear_cpu(const float* x, int64_t n, int64_t in, const float* packed, int64_t out, bool has_rms,
                       float rms_add, const float* residual, float* y, bool generic);

// The micro-kernel compiled into this build: "avx2-fma x12", "avx2-fma x6" or "generic".
const char* decode_linear_isa();

}  // namespace linear
}  // namespace mmfm
