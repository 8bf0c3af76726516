// Scalar types shared by the CPU and CUDA kernels, without torch headers, so that nvcc
// compiles the .cu files on a machine whose torch has no CUDA.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MMFM_HD __host__ __device__ __forceinline__
#else
#define MMFM_HD inline
#endif

namespace mmfm {

// Element type of a floating input, as the bindings pass it down.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
MMFM_HD float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, sizeof(f));
#endif
  return f;
}

// IEEE half -> fp32, including subnormals, inf and nan.
MMFM_HD float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, sizeof(f));
#endif
  return f;
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
