// Bindings of the quantization kernels: argument checks, output allocation, and dispatch to
// the CPU kernel or (when built with CUDA) the CUDA kernel. The schemas are declared in
// csrc/bindings.cpp; the same functions are registered for the CPU and CUDA keys.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "common/binding.h"
#include "common/checks.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

void check_levels(const at::Tensor& levels, const char* op) {
  check_dtype(levels, at::kLong, op, "levels");
  check_dim(levels, 1, op, "levels", "[C]");
  check_nonempty(levels, op, "levels");
  TORCH_CHECK_VALUE(levels.is_cpu(), "mmfm.", op, ": argument 'levels' must be a CPU tensor");
  TORCH_CHECK_VALUE(levels.min().item<int64_t>() >= 2, "mmfm.", op, ": every entry of 'levels' must be >= 2, got ",
              levels);
  double log_size = at::log(levels.to(at::kDouble)).sum().item<double>();
  TORCH_CHECK_VALUE(log_size < 62.0 * 0.6931471805599453, "mmfm.", op,
              ": the product of 'levels' must stay below 2^62 so indices fit int64");
}

// ---- nearest_code ------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z_, const at::Tensor& codebook_, int64_t topk,
                                                bool cosine) {
  const char* op = "nearest_code";
  check_float(z_, op, "z");
  check_float(codebook_, op, "codebook");
  check_dim(z_, 2, op, "z", "[N, D]");
  check_dim(codebook_, 2, op, "codebook", "[K, D]");
  check_same_device(z_, codebook_, op, "z", "codebook");
  check_device_supported(z_, op, "z");
  TORCH_CHECK_TYPE(z_.scalar_type() == codebook_.scalar_type(), "mmfm.", op, ": 'z' (", z_.scalar_type(),
              ") and 'codebook' (", codebook_.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(z_.size(1) == codebook_.size(1), "mmfm.", op, ": 'z' has D=", z_.size(1), " but 'codebook' has D=",
              codebook_.size(1), "; the last dimensions must match");
  check_nonempty(z_, op, "z");
  check_nonempty(codebook_, op, "codebook");
  TORCH_CHECK_VALUE(codebook_.size(0) < (int64_t(1) << 31), "mmfm.", op, ": 'codebook' has more than 2^31 codes");
  TORCH_CHECK_VALUE(topk >= 1 && topk <= codebook_.size(0), "mmfm.", op, ": 'topk' must be in [1, K=", codebook_.size(0),
              "], got ", topk);
  check_finite(z_, op, "z");
  check_finite(codebook_, op, "codebook");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous(), e = codebook_.contiguous();
  const int64_t N = z.size(0), K = e.size(0), D = z.size(1);
  at::Tensor idx = at::empty({N, topk}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N, topk}, z.options().dtype(at::kFloat));
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    // The CUDA kernel keeps each row's list in registers and shared memory.
    TORCH_CHECK_VALUE(topk <= 64, "mmfm.", op, ": 'topk' must be <= 64 for CUDA tensors, got ", topk,
                      "; move the inputs to the CPU for larger top-k");
    cuda_ok(nearest_code_cuda(z.data_ptr(), e.data_ptr(), dtype_of(z), N, K, D, topk, cosine,
                              idx.data_ptr<int64_t>(), dist.data_ptr<float>(), cuda_stream()),
            op);
    return {idx, dist};
  }
#endif
  nearest_code_cpu(z.data_ptr(), e.data_ptr(), dtype_of(z), N, K, D, topk, cosine, idx.data_ptr<int64_t>(),
                   dist.data_ptr<float>());
  return {idx, dist};
}

// ---- EMA statistics ----------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> code_stats(const at::Tensor& z_, const at::Tensor& indices_, int64_t num_codes) {
  const char* op = "code_stats";
  check_float(z_, op, "z");
  check_dim(z_, 2, op, "z", "[N, D]");
  check_dtype(indices_, at::kLong, op, "indices");
  check_dim(indices_, 1, op, "indices", "[N]");
  check_same_device(z_, indices_, op, "z", "indices");
  check_device_supported(z_, op, "z");
  TORCH_CHECK_VALUE(indices_.size(0) == z_.size(0), "mmfm.", op, ": 'indices' has ", indices_.size(0),
              " entries but 'z' has ", z_.size(0), " rows");
  TORCH_CHECK_VALUE(num_codes >= 1, "mmfm.", op, ": 'num_codes' must be >= 1, got ", num_codes);
  if (indices_.numel() > 0) {
    TORCH_CHECK_VALUE(indices_.min().item<int64_t>() >= 0 && indices_.max().item<int64_t>() < num_codes, "mmfm.", op,
                ": every entry of 'indices' must be in [0, num_codes=", num_codes, ")");
  }
  check_finite(z_, op, "z");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous(), idx = indices_.contiguous();
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor sums = at::empty({num_codes, D}, z.options().dtype(at::kFloat));
  at::Tensor counts = at::empty({num_codes}, z.options().dtype(at::kFloat));
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    cuda_ok(code_stats_cuda(z.data_ptr(), dtype_of(z), idx.data_ptr<int64_t>(), N, num_codes, D,
                            sums.data_ptr<float>(), counts.data_ptr<float>(), cuda_stream()),
            op);
    return {sums, counts};
  }
#endif
  code_stats_cpu(z.data_ptr(), dtype_of(z), idx.data_ptr<int64_t>(), N, num_codes, D, sums.data_ptr<float>(),
                 counts.data_ptr<float>());
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ema_codebook_update(
    const at::Tensor& cluster_size_, const at::Tensor& embed_sum_, const at::Tensor& counts_, const at::Tensor& sums_,
    double decay, double eps, double dead_threshold) {
  const char* op = "ema_codebook_update";
  check_dtype(cluster_size_, at::kFloat, op, "cluster_size");
  check_dtype(embed_sum_, at::kFloat, op, "embed_sum");
  check_dtype(counts_, at::kFloat, op, "counts");
  check_dtype(sums_, at::kFloat, op, "sums");
  check_dim(cluster_size_, 1, op, "cluster_size", "[K]");
  check_dim(embed_sum_, 2, op, "embed_sum", "[K, D]");
  check_nonempty(cluster_size_, op, "cluster_size");
  check_device_supported(cluster_size_, op, "cluster_size");
  const int64_t K = cluster_size_.size(0), D = embed_sum_.size(1);
  TORCH_CHECK_VALUE(embed_sum_.size(0) == K && counts_.sizes() == cluster_size_.sizes() && sums_.sizes() == embed_sum_.sizes(),
              "mmfm.", op, ": shapes must be cluster_size [K], embed_sum [K, D], counts [K], sums [K, D]; got ",
              cluster_size_.sizes(), ", ", embed_sum_.sizes(), ", ", counts_.sizes(), ", ", sums_.sizes());
  TORCH_CHECK_VALUE(decay >= 0.0 && decay < 1.0, "mmfm.", op, ": 'decay' must be in [0, 1), got ", decay);
  TORCH_CHECK_VALUE(eps > 0.0, "mmfm.", op, ": 'eps' must be > 0, got ", eps);
  for (const auto* t : {&embed_sum_, &counts_, &sums_}) check_same_device(cluster_size_, *t, op, "cluster_size", "embed_sum/counts/sums");
  MMFM_DEVICE_GUARD(cluster_size_);
  const at::Tensor size = cluster_size_.contiguous(), esum = embed_sum_.contiguous(), cnt = counts_.contiguous(),
                   sm = sums_.contiguous();
  at::Tensor new_size = at::empty_like(size), new_sum = at::empty_like(esum), codebook = at::empty_like(esum);
  at::Tensor dead = at::empty({K}, size.options().dtype(at::kBool));
#ifdef MMFM_WITH_CUDA
  if (size.is_cuda()) {
    cuda_ok(ema_update_cuda(size.data_ptr<float>(), esum.data_ptr<float>(), cnt.data_ptr<float>(),
                            sm.data_ptr<float>(), K, D, float(decay), float(eps), float(dead_threshold),
                            new_size.data_ptr<float>(), new_sum.data_ptr<float>(), codebook.data_ptr<float>(),
                            dead.data_ptr<bool>(), cuda_stream()),
            op);
    return {new_size, new_sum, codebook, dead};
  }
#endif
  ema_update_cpu(size.data_ptr<float>(), esum.data_ptr<float>(), cnt.data_ptr<float>(), sm.data_ptr<float>(), K, D,
                 float(decay), float(eps), float(dead_threshold), new_size.data_ptr<float>(),
                 new_sum.data_ptr<float>(), codebook.data_ptr<float>(), dead.data_ptr<bool>());
  return {new_size, new_sum, codebook, dead};
}

// ---- FSQ ---------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> fsq_quantize(const at::Tensor& z_, const at::Tensor& levels_) {
  const char* op = "fsq_quantize";
  check_float(z_, op, "z");
  check_dim(z_, 2, op, "z", "[N, C]");
  check_device_supported(z_, op, "z");
  check_levels(levels_, op);
  TORCH_CHECK_VALUE(z_.size(1) == levels_.size(0), "mmfm.", op, ": 'z' has C=", z_.size(1), " channels but 'levels' has ",
              levels_.size(0), " entries");
  check_finite(z_, op, "z");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous();
  const at::Tensor levels = levels_.to(z.device()).contiguous();
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor codes = at::empty({N, C}, z.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return {codes, idx};
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    cuda_ok(fsq_quantize_cuda(z.data_ptr(), dtype_of(z), levels.data_ptr<int64_t>(), N, C, codes.data_ptr<float>(),
                              idx.data_ptr<int64_t>(), cuda_stream()),
            op);
    return {codes, idx};
  }
#endif
  fsq_quantize_cpu(z.data_ptr(), dtype_of(z), levels.data_ptr<int64_t>(), N, C, codes.data_ptr<float>(),
                   idx.data_ptr<int64_t>());
  return {codes, idx};
}

at::Tensor fsq_indices_to_codes(const at::Tensor& indices_, const at::Tensor& levels_) {
  const char* op = "fsq_indices_to_codes";
  check_dtype(indices_, at::kLong, op, "indices");
  check_dim(indices_, 1, op, "indices", "[N]");
  check_device_supported(indices_, op, "indices");
  check_levels(levels_, op);
  const int64_t codebook_size = at::prod(levels_).item<int64_t>();
  if (indices_.numel() > 0) {
    TORCH_CHECK_VALUE(indices_.min().item<int64_t>() >= 0 && indices_.max().item<int64_t>() < codebook_size, "mmfm.", op,
                ": every entry of 'indices' must be in [0, prod(levels)=", codebook_size, ")");
  }
  MMFM_DEVICE_GUARD(indices_);
  const at::Tensor idx = indices_.contiguous();
  const at::Tensor levels = levels_.to(idx.device()).contiguous();
  const int64_t N = idx.size(0), C = levels.size(0);
  at::Tensor codes = at::empty({N, C}, idx.options().dtype(at::kFloat));
  if (N == 0) return codes;
#ifdef MMFM_WITH_CUDA
  if (idx.is_cuda()) {
    cuda_ok(fsq_indices_to_codes_cuda(idx.data_ptr<int64_t>(), levels.data_ptr<int64_t>(), N, C,
                                      codes.data_ptr<float>(), cuda_stream()),
            op);
    return codes;
  }
#endif
  fsq_indices_to_codes_cpu(idx.data_ptr<int64_t>(), levels.data_ptr<int64_t>(), N, C, codes.data_ptr<float>());
  return codes;
}

at::Tensor fsq_codes_to_indices(const at::Tensor& codes_, const at::Tensor& levels_) {
  const char* op = "fsq_codes_to_indices";
  check_float(codes_, op, "codes");
  check_dim(codes_, 2, op, "codes", "[N, C]");
  check_device_supported(codes_, op, "codes");
  check_levels(levels_, op);
  TORCH_CHECK_VALUE(codes_.size(1) == levels_.size(0), "mmfm.", op, ": 'codes' has C=", codes_.size(1),
              " channels but 'levels' has ", levels_.size(0), " entries");
  check_finite(codes_, op, "codes");
  MMFM_DEVICE_GUARD(codes_);
  const at::Tensor codes = codes_.to(at::kFloat).contiguous();
  const at::Tensor levels = levels_.to(codes.device()).contiguous();
  const int64_t N = codes.size(0), C = codes.size(1);
  at::Tensor idx = at::empty({N}, codes.options().dtype(at::kLong));
  if (N == 0) return idx;
#ifdef MMFM_WITH_CUDA
  if (codes.is_cuda()) {
    cuda_ok(fsq_codes_to_indices_cuda(codes.data_ptr<float>(), levels.data_ptr<int64_t>(), N, C,
                                      idx.data_ptr<int64_t>(), cuda_stream()),
            op);
    return idx;
  }
#endif
  fsq_codes_to_indices_cpu(codes.data_ptr<float>(), levels.data_ptr<int64_t>(), N, C, idx.data_ptr<int64_t>());
  return idx;
}

// ---- LFQ ---------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> lfq_quantize(const at::Tensor& z_) {
  const char* op = "lfq_quantize";
  check_float(z_, op, "z");
  check_dim(z_, 2, op, "z", "[N, d]");
  check_device_supported(z_, op, "z");
  TORCH_CHECK_VALUE(z_.size(1) >= 1 && z_.size(1) <= 62, "mmfm.", op, ": 'z' must have 1 to 62 bits per code (d), got ",
              z_.size(1));
  check_finite(z_, op, "z");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous();
  const int64_t N = z.size(0), d = z.size(1);
  at::Tensor codes = at::empty({N, d}, z.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return {codes, idx};
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    cuda_ok(lfq_quantize_cuda(z.data_ptr(), dtype_of(z), N, d, codes.data_ptr<float>(), idx.data_ptr<int64_t>(),
                              cuda_stream()),
            op);
    return {codes, idx};
  }
#endif
  lfq_quantize_cpu(z.data_ptr(), dtype_of(z), N, d, codes.data_ptr<float>(), idx.data_ptr<int64_t>());
  return {codes, idx};
}

at::Tensor lfq_indices_to_codes(const at::Tensor& indices_, int64_t dim) {
  const char* op = "lfq_indices_to_codes";
  check_dtype(indices_, at::kLong, op, "indices");
  check_dim(indices_, 1, op, "indices", "[N]");
  check_device_supported(indices_, op, "indices");
  TORCH_CHECK_VALUE(dim >= 1 && dim <= 62, "mmfm.", op, ": 'dim' must be in [1, 62], got ", dim);
  if (indices_.numel() > 0) {
    TORCH_CHECK_VALUE(indices_.min().item<int64_t>() >= 0 && indices_.max().item<int64_t>() < (int64_t(1) << dim), "mmfm.",
                op, ": every entry of 'indices' must be in [0, 2^dim)");
  }
  MMFM_DEVICE_GUARD(indices_);
  const at::Tensor idx = indices_.contiguous();
  const int64_t N = idx.size(0);
  at::Tensor codes = at::empty({N, dim}, idx.options().dtype(at::kFloat));
  if (N == 0) return codes;
#ifdef MMFM_WITH_CUDA
  if (idx.is_cuda()) {
    cuda_ok(lfq_indices_to_codes_cuda(idx.data_ptr<int64_t>(), N, dim, codes.data_ptr<float>(), cuda_stream()), op);
    return codes;
  }
#endif
  lfq_indices_to_codes_cpu(idx.data_ptr<int64_t>(), N, dim, codes.data_ptr<float>());
  return codes;
}

void check_entropy_args(const at::Tensor& z, double tau, bool exact, const char* op) {
  check_dtype(z, at::kFloat, op, "z");
  check_dim(z, 2, op, "z", "[N, d]");
  check_nonempty(z, op, "z");
  check_device_supported(z, op, "z");
  TORCH_CHECK_VALUE(tau > 0.0, "mmfm.", op, ": 'temperature' must be > 0, got ", tau);
  TORCH_CHECK_VALUE(z.size(1) <= 62, "mmfm.", op, ": 'z' has d=", z.size(1), " bits; at most 62 are supported");
  TORCH_CHECK_VALUE(!exact || z.size(1) <= 16, "mmfm.", op, ": 'exact' enumerates 2^d codes and needs d <= 16, got d=",
              z.size(1), "; pass exact=False for the factorised per-bit form");
}

at::Tensor lfq_entropy(const at::Tensor& z_, double tau, bool exact) {
  const char* op = "lfq_entropy";
  check_entropy_args(z_, tau, exact, op);
  check_finite(z_, op, "z");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous();
  const int64_t N = z.size(0), d = z.size(1);
  at::Tensor out = at::empty({2}, z.options());
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    at::Tensor ws = at::empty({lfq_entropy_workspace_floats(N, d, exact)}, z.options());
    cuda_ok(lfq_entropy_cuda(z.data_ptr<float>(), N, d, float(tau), exact, out.data_ptr<float>(), ws.data_ptr<float>(),
                             cuda_stream()),
            op);
    return out;
  }
#endif
  lfq_entropy_cpu(z.data_ptr<float>(), N, d, float(tau), exact, out.data_ptr<float>());
  return out;
}

at::Tensor lfq_entropy_backward(const at::Tensor& grad_out_, const at::Tensor& z_, double tau, bool exact) {
  const char* op = "lfq_entropy_backward";
  check_entropy_args(z_, tau, exact, op);
  check_dtype(grad_out_, at::kFloat, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out_.numel() == 2, "mmfm.", op, ": 'grad_out' must have 2 elements, got ", grad_out_.sizes());
  check_same_device(z_, grad_out_, op, "z", "grad_out");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous(), g = grad_out_.contiguous();
  const int64_t N = z.size(0), d = z.size(1);
  at::Tensor grad = at::empty_like(z);
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    at::Tensor ws = at::empty({lfq_entropy_workspace_floats(N, d, exact)}, z.options());
    cuda_ok(lfq_entropy_backward_cuda(z.data_ptr<float>(), N, d, float(tau), exact, g.data_ptr<float>(),
                                      grad.data_ptr<float>(), ws.data_ptr<float>(), cuda_stream()),
            op);
    return grad;
  }
#endif
  lfq_entropy_backward_cpu(z.data_ptr<float>(), N, d, float(tau), exact, g.data_ptr<float>(), grad.data_ptr<float>());
  return grad;
}

// ---- residual VQ -------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_vq(const at::Tensor& z_, const at::Tensor& codebooks_) {
  const char* op = "residual_vq";
  check_float(z_, op, "z");
  check_float(codebooks_, op, "codebooks");
  check_dim(z_, 2, op, "z", "[N, D]");
  check_dim(codebooks_, 3, op, "codebooks", "[M, K, D]");
  check_same_device(z_, codebooks_, op, "z", "codebooks");
  check_device_supported(z_, op, "z");
  TORCH_CHECK_TYPE(z_.scalar_type() == codebooks_.scalar_type(), "mmfm.", op, ": 'z' (", z_.scalar_type(),
              ") and 'codebooks' (", codebooks_.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(z_.size(1) == codebooks_.size(2), "mmfm.", op, ": 'z' has D=", z_.size(1), " but 'codebooks' has D=",
              codebooks_.size(2));
  check_nonempty(z_, op, "z");
  check_nonempty(codebooks_, op, "codebooks");
  TORCH_CHECK_VALUE(codebooks_.size(1) < (int64_t(1) << 31), "mmfm.", op, ": 'codebooks' has more than 2^31 codes");
  check_finite(z_, op, "z");
  check_finite(codebooks_, op, "codebooks");
  MMFM_DEVICE_GUARD(z_);
  const at::Tensor z = z_.contiguous(), cb = codebooks_.contiguous();
  const int64_t N = z.size(0), M = cb.size(0), K = cb.size(1), D = cb.size(2);
  at::Tensor idx = at::empty({N, M}, z.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({N, D}, z.options().dtype(at::kFloat));
  at::Tensor rnorm = at::empty({N, M}, z.options().dtype(at::kFloat));
#ifdef MMFM_WITH_CUDA
  if (z.is_cuda()) {
    cuda_ok(residual_vq_cuda(z.data_ptr(), cb.data_ptr(), dtype_of(z), N, M, K, D, idx.data_ptr<int64_t>(),
                             quantized.data_ptr<float>(), rnorm.data_ptr<float>(), cuda_stream()),
            op);
    return {idx, quantized, rnorm};
  }
#endif
  residual_vq_cpu(z.data_ptr(), cb.data_ptr(), dtype_of(z), N, M, K, D, idx.data_ptr<int64_t>(),
                  quantized.data_ptr<float>(), rnorm.data_ptr<float>());
  return {idx, quantized, rnorm};
}

void register_impls(torch::Library& m) {
  m.impl("nearest_code", &nearest_code);
  m.impl("code_stats", &code_stats);
  m.impl("ema_codebook_update", &ema_codebook_update);
  m.impl("fsq_quantize", &fsq_quantize);
  m.impl("fsq_indices_to_codes", &fsq_indices_to_codes);
  m.impl("fsq_codes_to_indices", &fsq_codes_to_indices);
  m.impl("lfq_quantize", &lfq_quantize);
  m.impl("lfq_indices_to_codes", &lfq_indices_to_codes);
  m.impl("lfq_entropy", &lfq_entropy);
  m.impl("lfq_entropy_backward", &lfq_entropy_backward);
  m.impl("residual_vq", &residual_vq);
}

}  // namespace
}  // namespace quant
}  // namespace mmfm

MMFM_REGISTER_CPU_AND_CUDA(mmfm::quant::register_impls)
