// Argument checks for the bindings. Every message names the op and the argument and says
// what was expected, so a user calling torch.ops.mmfm.* directly gets the same quality of
// error as through the Python wrappers.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#include "common/dtype.h"

namespace mmfm {

inline void check_float(const at::Tensor& t, const char* op, const char* arg, bool allow_half = false) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || (allow_half && st == at::kHalf);
  TORCH_CHECK_TYPE(ok, "mmfm.", op, ": argument '", arg, "' must be float32", allow_half ? ", float16" : "",
              " or bfloat16, got ", st);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "mmfm.", op, ": argument '", arg, "' must be ", want, ", got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "mmfm.", op, ": argument '", arg, "' must have shape ", shape, " (", dim,
              " dims), got ", t.sizes());
}

inline void check_nonempty(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.numel() > 0, "mmfm.", op, ": argument '", arg, "' is empty (shape ", t.sizes(),
              "); it needs at least one element");
}

bool all_finite_cpu(const void* data, DType dt, int64_t n);  // common/finite_cpu.cpp

inline DType dtype_of(const at::Tensor& t);

inline void check_finite(const at::Tensor& t, const char* op, const char* arg) {
  bool ok;
  const auto st = t.scalar_type();
  if (t.is_cpu() && t.is_contiguous() && (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf)) {
    ok = all_finite_cpu(t.data_ptr(), dtype_of(t), t.numel());
  } else {
    ok = at::isfinite(t).all().item<bool>();
  }
  TORCH_CHECK_VALUE(ok, "mmfm.", op, ": argument '", arg, "' contains NaN or inf; quantizer inputs must be finite");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                              const char* arg_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "mmfm.", op, ": arguments '", arg_a, "' (", a.device(), ") and '", arg_b,
              "' (", b.device(), ") must be on the same device");
}

// The build decides which devices an op accepts: CPU always, CUDA when compiled with it.
inline void check_device_supported(const at::Tensor& t, const char* op, const char* arg) {
#ifdef MMFM_WITH_CUDA
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), "mmfm.", op, ": argument '", arg, "' must be a CPU or CUDA tensor, got ",
                    t.device());
#else
  TORCH_CHECK_VALUE(t.is_cpu(), "mmfm.", op, ": argument '", arg, "' is on ", t.device(),
                    " but this mmfm._C was built without CUDA; rebuild with a CUDA torch and nvcc");
#endif
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      return DType::F32;
  }
}

}  // namespace mmfm
