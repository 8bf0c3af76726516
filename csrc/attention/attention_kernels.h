// Decode-time attention on the CPU: the few new queries of a decode step (one per row) or of a
// draft tree (n nodes of row 0) against a static KV cache. Raw pointers only; the binding
// (attention_binding.cpp) checks arguments.
#pragma once
#include <cstdint>

namespace mmfm {
namespace attention {

// q: [B, n, H, hd] with strides (qb, qn, qh) in floats and unit stride along hd.
// k, v: [B, Hkv, T, hd] contiguous. prefix [B]: row b's queries all see keys [0, prefix[b]);
// query i also sees key prefix[b] + j when mask[i * n + j] (mask nullptr: when j <= i).
// out: [B, n, H, hd] contiguous. scale: the score factor (1 / sqrt(hd)).
void decode_attention_cpu(const float* q, int64_t qb, int64_t qn, int64_t qh, const float* k, const float* v,
                          const int64_t* prefix, const bool* mask, float* out, int64_t B, int64_t n, int64_t H,
                          int64_t Hkv, int64_t T, int64_t hd, float scale, bool generic);

}  // namespace attention
}  // namespace mmfm
