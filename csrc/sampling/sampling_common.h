// Pieces of the sampling kernels that the CPU and CUDA versions share verbatim, so that both
// compute the same processed logits, the same thresholds and the same random numbers:
// the Philox4x32-10 counter-based generator, the uniform double built from it, the exp used
// for weights, the penalty formula and the per-row parameter checks. No torch headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/vecmath.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {

constexpr float kInf = __builtin_huge_valf();

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") ---------
// Counter (c0, c1, c2, c3) = (sub, row, offset_lo, offset_hi), key = (seed_lo, seed_hi).
// Every (seed, offset, row, sub) names its own four 32-bit words, so a draw does not depend
// on the order rows are processed in, on the thread count or on the device.
struct U32x4 {
  uint32_t v[4];
};

MMFM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

MMFM_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Two uniforms in [0, 1) with 53 random bits each (the numpy construction), from one Philox
// block. `sub` selects the block within a row: sample uses sub 0; chain verification uses
// sub j for position j (u0: accept coin, u1: residual draw); multi-draft uses sub i for
// candidate i and sub k for the final residual draw.
struct Uniform2 {
  double u0, u1;
};

MMFM_HD double u53(uint32_t a, uint32_t b) {
  return (static_cast<double>(a >> 5) * 67108864.0 + static_cast<double>(b >> 6)) * (1.0 / 9007199254740992.0);
}

MMFM_HD Uniform2 uniforms(uint64_t seed, uint64_t offset, int64_t row, uint32_t sub) {
  const U32x4 r = philox4x32_10(sub, static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
                                static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  Uniform2 u;
  u.u0 = u53(r.v[0], r.v[1]);
  u.u1 = u53(r.v[2], r.v[3]);
  return u;
}

// The uniform `sample` draws row `row` with (SampleArgs::row_offsets says which stream).
MMFM_HD double sample_uniform(const SampleArgs& a, int64_t row) {
  return a.row_offsets ? uniforms(a.seed, static_cast<uint64_t>(a.row_offsets[row]), 0, 0).u0
                       : uniforms(a.seed, a.offset, row, 0).u0;
}

template <DType D>
MMFM_HD float load(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::BF16) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// ---- exp for weights -------------------------------------------------------------------
// exp(x) for x <= 0 (x = s - max; NaN-free): the exp core of common/vecmath.h (about 1 ulp),
// branch-free so the CPU loops vectorise, with the scale 2^n split in two factors so that
// results down to the subnormal range are right (vexpf saturates there). exp(-inf) and
// anything below -103.9 give exactly 0.
MMFM_HD float exp_weight(float x) {  // x <= 0
  const float xc = select_f(x < -103.9f, -103.9f, x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (floorf would not vectorise); |n| <= 150
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = expf_reduce(xc, fn);
  const float z = r * r;
  const float p = expf_poly(r) * z + r + 1.0f;
  const int n = static_cast<int>(fn);           // in [-150, 0]
  const int n1 = n / 2, n2 = n - n1;            // each in [-75, 0]: normal exponents
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  const float v = p * s1 * s2;
  return select_f(x >= -103.9f, v, 0.f);
}

// ---- penalties ----------------------------------------------------------------------------
// For a token seen `count` > 0 times in the row's history (Keskar et al. for the repetition
// penalty, as in transformers' RepetitionPenaltyLogitsProcessor; OpenAI-style frequency and
// presence penalties): z <- z < 0 ? z * r : z / r;  z <- z - f * count;  z <- z - p.
// -inf stays -inf. Written as separate IEEE operations (no fused multiply-add) so the
// reference computes the very same floats.
MMFM_HD float apply_penalty(float z, int64_t count, float rep, float presence, float frequency) {
#if defined(__CUDA_ARCH__)
  z = z < 0.f ? __fmul_rn(z, rep) : __fdiv_rn(z, rep);
  z = __fsub_rn(z, __fmul_rn(frequency, static_cast<float>(count)));
  z = __fsub_rn(z, presence);
#else
  z = z < 0.f ? z * rep : z / rep;
  const float fc = frequency * static_cast<float>(count);
  z = z - fc;
  z = z - presence;
#endif
  return z;
}

// 1 / temperature in fp32, correctly rounded on both devices (nvcc's --use_fast_math would
// otherwise turn 1.0f / t into an approximate reciprocal).
MMFM_HD float inverse_temperature(float t) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(t);
#else
  return 1.0f / t;
#endif
}

MMFM_HD float scale_logit(float z, float inv_t) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(z, inv_t);
#else
  return z * inv_t;
#endif
}

// ---- parameter checks ------------------------------------------------------------------------
// Returns kOk or kBadParam + column of the first invalid parameter of a row.
MMFM_HD int32_t check_params(const float* p) {
  const float t = p[kTemperature], k = p[kTopK];
  if (!(t >= 0.f && t < 3.0e38f)) return kBadParam + kTemperature;
  if (!(k >= 0.f && k < 3.0e38f && k == floorf(k))) return kBadParam + kTopK;
  for (int c = kTopP; c <= kTypicalP; ++c)
    if (!(p[c] >= 0.f && p[c] <= 1.f)) return kBadParam + c;
  if (!(p[kRepetitionPenalty] > 0.f && p[kRepetitionPenalty] < 3.0e38f)) return kBadParam + kRepetitionPenalty;
  for (int c = kPresencePenalty; c <= kFrequencyPenalty; ++c)
    if (!(p[c] > -3.0e38f && p[c] < 3.0e38f)) return kBadParam + c;
  return kOk;
}

// Probabilities handed to verification must be finite and >= 0. `&` rather than `&&`: no
// branch, so the CPU row checks vectorise.
MMFM_HD bool valid_prob(float x) { return (x >= 0.f) & (x < kInf); }

MMFM_HD bool has_penalty(const float* p) {
  return p[kRepetitionPenalty] != 1.f || p[kPresencePenalty] != 0.f || p[kFrequencyPenalty] != 0.f;
}

}  // namespace sampling
}  // namespace mmfm
