// Bindings of the key-value cache ops: argument checks naming the argument, dispatch to the
// CPU or (when built with CUDA) the CUDA kernel, and the translation of the kernels' per-row
// status into an error naming the argument and the row. Schemas in csrc/bindings.cpp.
//
// The cache must be contiguous (the ops write it in place and move whole slot runs); sources
// need unit stride only along D. On CUDA the status is read back after the kernels (one small
// device-to-host copy, which synchronises the stream), as the sampling ops do.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cache/cache_kernels.h"
#include "common/binding.h"
#include "common/checks.h"

namespace mmfm {
namespace cache {
namespace {

CacheDims check_cache(const at::Tensor& cache, const char* op) {
  check_float(cache, op, "cache", /*allow_half=*/true);
  check_dim(cache, 4, op, "cache", "[B, H, T, D]");
  check_device_supported(cache, op, "cache");
  TORCH_CHECK_VALUE(cache.is_contiguous(), "mmfm.", op, ": argument 'cache' must be contiguous (strides ",
                    cache.strides(), " for shape ", cache.sizes(), "); the op writes its [B, H, T, D] slots in place");
  CacheDims c;
  c.B = cache.size(0);
  c.H = cache.size(1);
  c.T = cache.size(2);
  c.row_bytes = cache.size(3) * static_cast<int64_t>(cache.element_size());
  return c;
}

// A source [B, H, L, D] matching the cache: same dtype and device, unit stride along D.
Source check_source(const at::Tensor& cache, const at::Tensor& s, const char* op, const char* arg) {
  check_float(s, op, arg, /*allow_half=*/true);
  TORCH_CHECK_TYPE(s.scalar_type() == cache.scalar_type(), "mmfm.", op, ": argument '", arg, "' (", s.scalar_type(),
                   ") must have the dtype of 'cache' (", cache.scalar_type(), ")");
  check_dim(s, 4, op, arg, "[B, H, L, D]");
  TORCH_CHECK_VALUE(s.size(0) == cache.size(0) && s.size(1) == cache.size(1) && s.size(3) == cache.size(3), "mmfm.",
                    op, ": argument '", arg, "' must have shape [B=", cache.size(0), ", H=", cache.size(1),
                    ", L, D=", cache.size(3), "] to match 'cache', got ", s.sizes());
  check_same_device(cache, s, op, "cache", arg);
  TORCH_CHECK_VALUE(s.size(3) <= 1 || s.stride(3) == 1, "mmfm.", op, ": argument '", arg,
                    "' must have unit stride along D (its last dim), got strides ", s.strides(),
                    "; call .contiguous() on it");
  const int64_t es = static_cast<int64_t>(s.element_size());
  Source src;
  src.data = s.data_ptr();
  src.L = s.size(2);
  src.sb = s.stride(0) * es;
  src.sh = s.stride(1) * es;
  src.sl = s.stride(2) * es;
  return src;
}

at::Tensor check_index(const at::Tensor& cache, const at::Tensor& t, int64_t n, const char* op, const char* arg) {
  check_dtype(t, at::kLong, op, arg);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "mmfm.", op, ": argument '", arg, "' must have shape [", n,
                    "], got ", t.sizes());
  check_same_device(cache, t, op, "cache", arg);
  return t.contiguous();
}

#ifdef MMFM_WITH_CUDA
// Widest access the CUDA copy kernels may use for these pointers and strides.
int vec_bytes(const CacheDims& c, const void* cache, const void* other, const Source* src) {
  std::vector<int64_t> v = {c.row_bytes, static_cast<int64_t>(reinterpret_cast<uintptr_t>(cache)),
                            static_cast<int64_t>(reinterpret_cast<uintptr_t>(other))};
  if (src != nullptr) {
    v.insert(v.end(), {src->sb, src->sh, src->sl, static_cast<int64_t>(reinterpret_cast<uintptr_t>(src->data))});
  }
  return vec_bytes_for(v.data(), static_cast<int>(v.size()));
}
#endif

// Status of each row, on the host.
struct Rows {
  std::vector<int32_t> host;
  at::Tensor device;  // CUDA: [n + 1] int32 written by the kernels
  int32_t* ptr(int64_t n, const at::Tensor& like) {
    if (like.is_cuda()) {
      device = at::empty({n + 1}, like.options().dtype(at::kInt));
      return device.data_ptr<int32_t>();
    }
    host.assign(static_cast<size_t>(n), kOk);
    return host.data();
  }
  // Index of the first bad row, or -1.
  int64_t first_bad(int64_t n) {
    if (device.defined()) {
      const at::Tensor h = device.cpu();
      host.assign(h.data_ptr<int32_t>(), h.data_ptr<int32_t>() + n);
    }
    for (int64_t i = 0; i < n && i < static_cast<int64_t>(host.size()); ++i) {
      if (host[i] != kOk) return i;
    }
    return -1;
  }
};

int64_t at_row(const at::Tensor& t, int64_t i) { return t[i].item<int64_t>(); }

void kv_append(const at::Tensor& cache, const at::Tensor& new_, const at::Tensor& starts_,
               const std::optional<at::Tensor>& counts_) {
  const char* op = "kv_append";
  const CacheDims c = check_cache(cache, op);
  const Source src = check_source(cache, new_, op, "new");
  const at::Tensor starts = check_index(cache, starts_, c.B, op, "starts");
  at::Tensor counts;
  if (counts_.has_value()) counts = check_index(cache, *counts_, c.B, op, "counts");
  const int64_t* cp = counts.defined() ? counts.data_ptr<int64_t>() : nullptr;
  MMFM_DEVICE_GUARD(cache);
  Rows st;
  int32_t* status = st.ptr(c.B, cache);
#ifdef MMFM_WITH_CUDA
  if (cache.is_cuda()) {
    cuda_ok(kv_append_cuda(cache.data_ptr(), c, src, starts.data_ptr<int64_t>(), cp,
                           vec_bytes(c, cache.data_ptr(), src.data, &src), status, cuda_stream()),
            op);
  } else
#endif
  {
    kv_append_cpu(cache.data_ptr(), c, src, starts.data_ptr<int64_t>(), cp, status);
  }
  const int64_t b = st.first_bad(c.B);
  if (b < 0) return;
  const int64_t s = at_row(starts, b), n = counts.defined() ? at_row(counts, b) : src.L;
  switch (st.host[b]) {
    case kBadStart:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'starts' is ", s, " for row ", b, "; it must be >= 0");
    case kBadCount:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'counts' is ", n, " for row ", b, "; it must lie in [0, L=",
                        src.L, "]");
    default:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": row ", b, ": starts + counts = ", s, " + ", n,
                        " exceeds the cache capacity T=", c.T, "; nothing was written");
  }
}

void kv_insert(const at::Tensor& cache, const at::Tensor& lengths_, const at::Tensor& at_,
               const at::Tensor& entries) {
  const char* op = "kv_insert";
  const CacheDims c = check_cache(cache, op);
  const Source src = check_source(cache, entries, op, "entries");
  const at::Tensor lengths = check_index(cache, lengths_, c.B, op, "lengths");
  const at::Tensor at = check_index(cache, at_, c.B, op, "at");
  MMFM_DEVICE_GUARD(cache);
  Rows st;
  int32_t* status = st.ptr(c.B, cache);
#ifdef MMFM_WITH_CUDA
  if (cache.is_cuda()) {
    cuda_ok(kv_insert_cuda(cache.data_ptr(), c, src, lengths.data_ptr<int64_t>(), at.data_ptr<int64_t>(),
                           vec_bytes(c, cache.data_ptr(), src.data, &src), status, cuda_stream()),
            op);
  } else
#endif
  {
    kv_insert_cpu(cache.data_ptr(), c, src, lengths.data_ptr<int64_t>(), at.data_ptr<int64_t>(), status);
  }
  const int64_t b = st.first_bad(c.B);
  if (b < 0) return;
  const int64_t n = at_row(lengths, b), a = at_row(at, b);
  switch (st.host[b]) {
    case kBadLength:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'lengths' is ", n, " for row ", b,
                        "; it must lie in [0, T=", c.T, "]");
    case kBadAt:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'at' is ", a, " for row ", b, "; it must lie in [0, lengths[",
                        b, "]=", n, "]");
    default:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": row ", b, ": lengths + N = ", n, " + ", src.L,
                        " exceeds the cache capacity T=", c.T, "; nothing was written");
  }
}

at::Tensor kv_gather_rows(const at::Tensor& cache, const at::Tensor& rows_) {
  const char* op = "kv_gather_rows";
  const CacheDims c = check_cache(cache, op);
  check_dtype(rows_, at::kLong, op, "rows");
  check_dim(rows_, 1, op, "rows", "[R]");
  check_same_device(cache, rows_, op, "cache", "rows");
  const at::Tensor rows = rows_.contiguous();
  const int64_t R = rows.size(0);
  MMFM_DEVICE_GUARD(cache);
  at::Tensor out = at::empty({R, c.H, c.T, cache.size(3)}, cache.options());
  Rows st;
  int32_t* status = st.ptr(R, cache);
#ifdef MMFM_WITH_CUDA
  if (cache.is_cuda()) {
    cuda_ok(kv_gather_rows_cuda(cache.data_ptr(), c, rows.data_ptr<int64_t>(), R, out.data_ptr(),
                                vec_bytes(c, cache.data_ptr(), out.data_ptr(), nullptr), status, cuda_stream()),
            op);
  } else
#endif
  {
    kv_gather_rows_cpu(cache.data_ptr(), c, rows.data_ptr<int64_t>(), R, out.data_ptr(), status);
  }
  const int64_t r = st.first_bad(R);
  TORCH_CHECK_VALUE(r < 0, "mmfm.", op, ": argument 'rows' holds ", r < 0 ? 0 : at_row(rows, r), " at position ", r,
                    "; rows must lie in [0, B=", c.B, ")");
  return out;
}

void register_impls(torch::Library& m) {
  m.impl("kv_append", &kv_append);
  m.impl("kv_insert", &kv_insert);
  m.impl("kv_gather_rows", &kv_gather_rows);
}

}  // namespace
}  // namespace cache
}  // namespace mmfm

MMFM_REGISTER_CPU_AND_CUDA(mmfm::cache::register_impls)
