// Binding of decode_linear (CPU only: on a GPU the decode step's few-row matmuls are what
// cuBLAS is built for, and mmfm.ops.linear sends CUDA tensors to torch). Schema in
// csrc/bindings.cpp; argument checks name the argument and say what is expected.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "common/checks.h"
#include "linear/linear_kernels.h"

namespace mmfm {
namespace linear {
namespace {

void check_f32_cpu(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "mmfm.decode_linear: argument '", arg, "' must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cpu(), "mmfm.decode_linear: argument '", arg, "' must be a CPU tensor, got ", t.device(),
                    " (on CUDA use torch.mm; mmfm.ops.linear does)");
}

at::Tensor decode_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_features,
                         std::optional<double> rms_add, const std::optional<at::Tensor>& residual_in, bool generic) {
  check_f32_cpu(x_in, "x");
  check_f32_cpu(packed, "packed");
  check_dim(x_in, 2, "decode_linear", "x", "[n, in]");
  check_dim(packed, 3, "decode_linear", "packed", "[ceil(out_features / 16), in, 16]");
  const int64_t n = x_in.size(0), in = x_in.size(1);
  TORCH_CHECK_VALUE(out_features > 0, "mmfm.decode_linear: argument 'out_features' must be positive, got ",
                    out_features);
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  TORCH_CHECK_VALUE(packed.size(0) == panels && packed.size(1) == in && packed.size(2) == kPanel,
                    "mmfm.decode_linear: argument 'packed' must have shape [", panels, ", ", in, ", ", kPanel,
                    "] for out_features=", out_features, " and x's in=", in, ", got ", packed.sizes(),
                    " (pack the [in, out] weight with mmfm.ops.linear.pack_linear)");
  TORCH_CHECK_VALUE(packed.is_contiguous(), "mmfm.decode_linear: argument 'packed' must be contiguous");
  if (rms_add.has_value()) {
    TORCH_CHECK_VALUE(*rms_add >= 0.0, "mmfm.decode_linear: argument 'rms_add' must be >= 0, got ", *rms_add);
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = *residual_in;
    check_f32_cpu(residual, "residual");
    TORCH_CHECK_VALUE(residual.dim() == 2 && residual.size(0) == n && residual.size(1) == out_features,
                      "mmfm.decode_linear: argument 'residual' must have shape [", n, ", ", out_features, "], got ",
                      residual.sizes());
    residual = residual.contiguous();
  }
  at::Tensor y = at::empty({n, out_features}, x.options());
  decode_linear_cpu(x.data_ptr<float>(), n, in, packed.data_ptr<float>(), out_features, rms_add.has_value(),
                    rms_add.has_value() ? static_cast<float>(*rms_add) : 0.f,
                    residual.defined() ? residual.data_ptr<float>() : nullptr, y.data_ptr<float>(), generic);
  return y;
}

}  // namespace
}  // namespace linear
}  // namespace mmfm

TORCH_LIBRARY_IMPL(mmfm, CPU, m) { m.impl("decode_linear", &mmfm::linear::decode_linear); }

