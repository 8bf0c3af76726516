// Scalar types shared by the CPU and CUDA kernels, without torch headers, so that nvcc
// compiles the .cu files on a machine whose torch has no CUDA.
#pragma once
#include <cstdint>
#include <cstring>

// MMFM_HD marks the functions that CPU and CUDA kernels share: one definition, compiled by
// the host compiler for the .cpp kernels and by nvcc for both sides of the .cu kernels.
#if defined(__CUDACC__)
#define MMFM_HD __host__ __device__ __forceinline__
#else
#define MMFM_HD inline
#endif

namespace mmfm {

// Element type of a floating input, as the bindings pass it down.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---- bit casts ------------------------------------------------------------------------------
MMFM_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__CUDACC__)
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#else
  return __builtin_bit_cast(float, u);  // unlike memcpy, keeps the CPU loops vectorisable
#endif
}

MMFM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__CUDACC__)
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
MMFM_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// c ? a : b without a branch. GCC does not if-convert float selects whose arms compute (they
// might trap) unless the target has mask registers (AVX-512), so the CPU loops use bit masks
// to stay vectorised on AVX2 and other targets.
MMFM_HD float select_f(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
#endif
}

// IEEE half -> fp32, exact, including subnormals, inf and NaN; branch-free so that the CPU
// load loops vectorise.
MMFM_HD float f16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const float f = select_f(two_w < (1u << 27), denormalized, normalized);
  return bits_to_float(sign | float_to_bits(f));
}

// Reads element i of a floating buffer of type `dt` as fp32.
MMFM_HD float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::BF16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16:
      return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

}  // namespace mmfm
