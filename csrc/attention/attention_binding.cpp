// Binding of decode_attention (CPU only, like decode_linear: on a GPU, SDPA / flash-attn are the
// kernels for this; mmfm.ops.attention sends CUDA tensors to torch). Schema in csrc/bindings.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "attention/attention_kernels.h"
#include "common/checks.h"

namespace mmfm {
namespace attention {
namespace {

void check_f32_cpu(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "mmfm.decode_attention: argument '", arg,
                   "' must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cpu(), "mmfm.decode_attention: argument '", arg, "' must be a CPU tensor, got ", t.device(),
                    " (on CUDA use torch's scaled_dot_product_attention; mmfm.ops.attention does)");
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& prefix_in, const std::optional<at::Tensor>& mask_in, bool generic) {
  check_f32_cpu(q_in, "q");
  check_f32_cpu(k, "k");
  check_f32_cpu(v, "v");
  check_dim(q_in, 4, "decode_attention", "q", "[B, n, H, hd]");
  check_dim(k, 4, "decode_attention", "k", "[B, Hkv, T, hd]");
  const int64_t B = q_in.size(0), n = q_in.size(1), H = q_in.size(2), hd = q_in.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == hd, "mmfm.decode_attention: argument 'k' must have shape [B=", B,
                    ", Hkv, T, hd=", hd, "] to match 'q', got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "mmfm.decode_attention: argument 'v' must have the shape of 'k' ",
                    k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(k.is_contiguous() && v.is_contiguous(),
                    "mmfm.decode_attention: arguments 'k' and 'v' must be contiguous [B, Hkv, T, hd] (a cache layer)");
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "mmfm.decode_attention: q's H=", H,
                    " must be a multiple of k's Hkv=", Hkv, " (grouped-query heads)");
  TORCH_CHECK_VALUE(n >= 1 && hd >= 1, "mmfm.decode_attention: argument 'q' is empty (shape ", q_in.sizes(), ")");
  TORCH_CHECK_TYPE(prefix_in.scalar_type() == at::kLong && prefix_in.is_cpu(),
                   "mmfm.decode_attention: argument 'prefix' must be a CPU int64 tensor [B], got ",
                   prefix_in.scalar_type(), " on ", prefix_in.device());
  TORCH_CHECK_VALUE(prefix_in.dim() == 1 && prefix_in.size(0) == B, "mmfm.decode_attention: argument 'prefix' must ",
                    "have shape [B=", B, "], got ", prefix_in.sizes());
  const at::Tensor prefix = prefix_in.contiguous();
  const int64_t* pp = prefix.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(pp[b] >= 0 && pp[b] + n <= T, "mmfm.decode_attention: argument 'prefix' row ", b, ": ", pp[b],
                      " + n=", n, " new keys must lie in the cache's T=", T, " slots");
  }
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool && mask.is_cpu(),
                     "mmfm.decode_attention: argument 'mask' must be a CPU bool tensor [n, n], got ", mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == n,
                      "mmfm.decode_attention: argument 'mask' must have shape [n=", n, ", n=", n, "], got ",
                      mask.sizes());
    const bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(m[i * n + i], "mmfm.decode_attention: argument 'mask' row ", i,
                        " must let query ", i, " see its own key (mask[i, i] = True)");
    }
  }
  at::Tensor q = q_in;
  if (q.stride(3) != 1) q = q.contiguous();
  at::Tensor out = at::empty({B, n, H, hd}, q.options().memory_format(at::MemoryFormat::Contiguous));
  decode_attention_cpu(q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr<float>(),
                       v.data_ptr<float>(), pp, mask.defined() ? mask.data_ptr<bool>() : nullptr,
                       out.data_ptr<float>(), B, n, H, Hkv, T, hd, static_cast<float>(1.0 / std::sqrt(double(hd))),
                       generic);
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace mmfm

TORCH_LIBRARY_IMPL(mmfm, CPU, m) { m.impl("decode_attention", &mmfm::attention::decode_attention); }
