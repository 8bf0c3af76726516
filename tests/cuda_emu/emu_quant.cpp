// The CUDA quantization kernels (csrc/quant/*_cuda.cu, launchers included) built against the
// CPU stand-in in cuda_runtime.h, behind a C interface for ctypes
// (tests/test_quant_cuda_emulated.py). tests/emu_build.py compiles each .cu beside this file
// with its launches rewritten for the emulator; the block sizes are the production ones
// (256 threads, 1024 for the one-block reductions, 128 for the split merge). Every entry point
// returns the launcher's cudaError_t (0 = success); a stream is never used, so nullptr is passed.
#include <cstdlib>

#include "cuda_runtime.h"
#include "quant/quant_kernels.h"

using namespace mmfm;
using namespace mmfm::quant;

extern "C" {

void emu_set_sms(int n) { emu::sm_count() = n; }

int emu_nearest_code(const void* z, const void* codebook, int dt, int64_t N, int64_t K, int64_t D, int64_t topk,
                     int cosine, int64_t* idx, float* dist) {
  return nearest_code_cuda(z, codebook, static_cast<DType>(dt), N, K, D, topk, cosine != 0, idx, dist, nullptr);
}

int emu_code_stats(const void* z, int dt, const int64_t* idx, int64_t N, int64_t K, int64_t D, float* sums,
                   float* counts) {
  return code_stats_cuda(z, static_cast<DType>(dt), idx, N, K, D, sums, counts, nullptr);
}

int emu_ema_update(const float* size, const float* embed_sum, const float* counts, const float* sums, int64_t K,
                   int64_t D, float decay, float eps, float dead_threshold, float* new_size, float* new_sum,
                   float* codebook, bool* dead) {
  return ema_update_cuda(size, embed_sum, counts, sums, K, D, decay, eps, dead_threshold, new_size, new_sum, codebook,
                         dead, nullptr);
}

int emu_fsq_quantize(const void* z, int dt, const int64_t* levels, int64_t N, int64_t C, float* codes, int64_t* idx) {
  return fsq_quantize_cuda(z, static_cast<DType>(dt), levels, N, C, codes, idx, nullptr);
}

int emu_fsq_indices_to_codes(const int64_t* idx, const int64_t* levels, int64_t N, int64_t C, float* codes) {
  return fsq_indices_to_codes_cuda(idx, levels, N, C, codes, nullptr);
}

int emu_fsq_codes_to_indices(const float* codes, const int64_t* levels, int64_t N, int64_t C, int64_t* idx) {
  return fsq_codes_to_indices_cuda(codes, levels, N, C, idx, nullptr);
}

int emu_lfq_quantize(const void* z, int dt, int64_t N, int64_t d, float* codes, int64_t* idx) {
  return lfq_quantize_cuda(z, static_cast<DType>(dt), N, d, codes, idx, nullptr);
}

int emu_lfq_indices_to_codes(const int64_t* idx, int64_t N, int64_t d, float* codes) {
  return lfq_indices_to_codes_cuda(idx, N, d, codes, nullptr);
}

// The workspace is sized by lfq_entropy_workspace_floats and 256-byte aligned, as the binding
// allocates it; filled with NaN so a partial the kernels forget to write shows up.
static float* entropy_workspace(int64_t N, int64_t d, bool exact) {
  const int64_t n = lfq_entropy_workspace_floats(N, d, exact);
  const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 255) / 256 * 256;
  float* w = static_cast<float*>(std::aligned_alloc(256, bytes));
  for (int64_t i = 0; i < n; ++i) w[i] = __int_as_float(0x7fc00000);
  return w;
}

int emu_lfq_entropy(const float* z, int64_t N, int64_t d, float tau, int exact, float* out) {
  float* w = entropy_workspace(N, d, exact != 0);
  const int e = lfq_entropy_cuda(z, N, d, tau, exact != 0, out, w, nullptr);
  std::free(w);
  return e;
}

int emu_lfq_entropy_backward(const float* z, int64_t N, int64_t d, float tau, int exact, const float* g,
                             float* grad_z) {
  float* w = entropy_workspace(N, d, exact != 0);
  const int e = lfq_entropy_backward_cuda(z, N, d, tau, exact != 0, g, grad_z, w, nullptr);
  std::free(w);
  return e;
}

int emu_residual_vq(const void* z, const void* codebooks, int dt, int64_t N, int64_t M, int64_t K, int64_t D,
                    int64_t* idx, float* quantized, float* residual_norm) {
  return residual_vq_cuda(z, codebooks, static_cast<DType>(dt), N, M, K, D, idx, quantized, residual_norm, nullptr);
}

}  // extern "C"
