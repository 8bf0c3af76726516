// Raw-pointer entry points of the quantization kernels.
//
// Every kernel here exists twice with the same contract: `*_cpu` (quant/*_cpu.cpp, OpenMP)
// and `*_cuda` (quant/*_cuda.cu, launched on `stream`, a cudaStream_t passed as void*).
// The bindings (quant/quant_binding.cpp) validate tensors, make them contiguous and call
// these; nothing here includes torch, so nvcc builds the .cu files without a CUDA torch.
//
// All buffers are contiguous row-major. Accumulation is fp32. CUDA launchers return a
// cudaError_t as int (0 = success); the binding turns non-zero into an error message
// (cuda_ok, common/binding.h).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace mmfm {
namespace quant {

// ---- 1. nearest-code search ---------------------------------------------------------
// z [N, D] and codebook [K, D] of element type `dt` (F32 or BF16).
// For each row writes its `topk` nearest codes in ascending squared-L2 distance:
// idx [N, topk] (int64), dist [N, topk] (fp32, clamped at 0). Ties go to the lowest index.
// cosine: rows and codes are l2-normalised first (distance = 2 - 2 cos); a zero vector
// stays zero. Never forms the N x K distance matrix.
void nearest_code_cpu(const void* z, const void* codebook, DType dt, int64_t N, int64_t K, int64_t D,
                      int64_t topk, bool cosine, int64_t* idx, float* dist);

// ---- 2. EMA codebook statistics -----------------------------------------------------
// sums [K, D] = sum of z rows assigned to each code, counts [K] = number of rows.
// Deterministic: each code sums its rows in row order, whatever the thread count.
// Indices outside [0, K) must be rejected by the caller.
void code_stats_cpu(const void* z, DType dt, const int64_t* idx, int64_t N, int64_t K, int64_t D, float* sums,
                    float* counts);

// One EMA step with Laplace smoothing (all fp32):
//   new_size = decay * size + (1 - decay) * counts
//   new_sum  = decay * embed_sum + (1 - decay) * sums
//   n = sum(new_size); smoothed = (new_size + eps) / (n + K * eps) * n
//   codebook = new_sum / smoothed;  dead = new_size < dead_threshold
void ema_update_cpu(const float* size, const float* embed_sum, const float* counts, const float* sums, int64_t K,
                    int64_t D, float decay, float eps, float dead_threshold, float* new_size, float* new_sum,
                    float* codebook, bool* dead);

// ---- 3. FSQ ---------------------------------------------------------------------------
// levels [C] (int64, each >= 2). For z [N, C]:
//   half_l = (L - 1) * (1 + 1e-3) / 2, offset = 0.5 if L even else 0, shift = atanh(offset / half_l)
//   q = round(tanh(z + shift) * half_l - offset)          (integers, L distinct values)
//   codes = q / (L / 2)  (integer division)               (in [-1, 1])
//   index = sum_c (q_c + L_c / 2) * prod_{c' < c} L_c'    (mixed radix, channel 0 fastest)
void fsq_quantize_cpu(const void* z, DType dt, const int64_t* levels, int64_t N, int64_t C, float* codes,
                      int64_t* idx);
void fsq_indices_to_codes_cpu(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes);
// codes must lie on the grid (as produced above); they are rounded to the nearest level.
void fsq_codes_to_indices_cpu(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx);

// ---- 4. LFQ / binary latents --------------------------------------------------------
// codes = +1 where z > 0 else -1; index = sum_i 2^i [z_i > 0]. d <= 62.
void lfq_quantize_cpu(const void* z, DType dt, int64_t N, int64_t d, float* codes, int64_t* idx);
void lfq_indices_to_codes_cpu(const int64_t* idx, int64_t N, int64_t d, float* codes);

// Entropy terms of the LFQ penalty with bit probabilities p_{n,i} = sigmoid(4 z_{n,i} / tau)
// (softmax over the 2^d codes of -||z - c||^2 / tau factorises into these):
//   out[0] = mean_n H(q_n)   = mean_n sum_i Hb(p_{n,i})            (exact, factorised)
//   out[1] = H(mean_n q_n):  exact (enumerates the 2^d codes, d <= 16) or, with exact=false,
//            the per-bit form sum_i Hb(mean_n p_{n,i}) (an upper bound, O(N d)).
// Natural log. z is fp32 [N, d].
void lfq_entropy_cpu(const float* z, int64_t N, int64_t d, float tau, bool exact, float* out);
// Gradient of g[0] * out[0] + g[1] * out[1] with respect to z, written to grad_z [N, d].
// `g` points to 2 floats on the same device as z.
void lfq_entropy_backward_cpu(const float* z, int64_t N, int64_t d, float tau, bool exact, const float* g,
                              float* grad_z);

// ---- 5. residual VQ ---------------------------------------------------------------------
// z [N, D] (F32 or BF16), codebooks [M, K, D] of the same type. r_0 = z;
// k_m = argmin_j ||r_{m-1} - e^m_j||^2 (ties: lowest); r_m = r_{m-1} - e^m_{k_m}.
// Writes idx [N, M], quantized [N, D] = sum_m e^m_{k_m} (fp32), and
// residual_norm [N, M] = ||r_m||^2 after each level.
void residual_vq_cpu(const void* z, const void* codebooks, DType dt, int64_t N, int64_t M, int64_t K, int64_t D,
                     int64_t* idx, float* quantized, float* residual_norm);

// CUDA versions (quant/*_cuda.cu); declared in every build, defined only when setup.py
// compiles the .cu files (the bindings call them only under MMFM_WITH_CUDA).
int nearest_code_cuda(const void* z, const void* codebook, DType dt, int64_t N, int64_t K, int64_t D, int64_t topk,
                      bool cosine, int64_t* idx, float* dist, void* stream);
// The CUDA version may use atomics only if the result stays deterministic; counts are exact.
int code_stats_cuda(const void* z, DType dt, const int64_t* idx, int64_t N, int64_t K, int64_t D, float* sums,
                    float* counts, void* stream);
int ema_update_cuda(const float* size, const float* embed_sum, const float* counts, const float* sums, int64_t K,
                    int64_t D, float decay, float eps, float dead_threshold, float* new_size, float* new_sum,
                    float* codebook, bool* dead, void* stream);
int fsq_quantize_cuda(const void* z, DType dt, const int64_t* levels, int64_t N, int64_t C, float* codes,
                      int64_t* idx, void* stream);
int fsq_indices_to_codes_cuda(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes,
                              void* stream);
int fsq_codes_to_indices_cuda(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx,
                              void* stream);
int lfq_quantize_cuda(const void* z, DType dt, int64_t N, int64_t d, float* codes, int64_t* idx, void* stream);
int lfq_indices_to_codes_cuda(const int64_t* idx, int64_t N, int64_t d, float* codes, void* stream);
// `workspace` holds at least lfq_entropy_workspace_floats(N, d, exact) floats (device memory).
int64_t lfq_entropy_workspace_floats(int64_t N, int64_t d, bool exact);
int lfq_entropy_cuda(const float* z, int64_t N, int64_t d, float tau, bool exact, float* out, float* workspace,
                     void* stream);
int lfq_entropy_backward_cuda(const float* z, int64_t N, int64_t d, float tau, bool exact, const float* g,
                              float* grad_z, float* workspace, void* stream);
int residual_vq_cuda(const void* z, const void* codebooks, DType dt, int64_t N, int64_t M, int64_t K, int64_t D,
                     int64_t* idx, float* quantized, float* residual_norm, void* stream);

}  // namespace quant
}  // namespace mmfm
