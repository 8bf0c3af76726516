// Launchers of the key-value cache kernels (kv_cuda_kernel.cuh): validation first, then the
// copy kernel, both on the op's stream; the copy kernel reads the validation's any-bad flag,
// so a bad row leaves the cache untouched without a host round trip in between.
#include <cuda_runtime.h>

#include <cstdint>

#include "cache/cache_kernels.h"
#include "cache/kv_cuda_kernel.cuh"
#include "common/cuda_launch.cuh"

namespace mmfm {
namespace cache {

namespace {

cudaError_t validate(cuda::Check mode, int64_t n, const int64_t* a, const int64_t* b, int64_t p1, int64_t p2,
                     int32_t* status, cudaStream_t st) {
  cuda::validate_kernel<<<1, cuda::kThreads, 0, st>>>(mode, n, a, b, p1, p2, status);
  return cudaGetLastError();
}

template <int W>
void launch_append(void* cache, const CacheDims& c, const Source& src, const int64_t* starts, const int64_t* counts,
                   const int32_t* flag, cudaStream_t st) {
  const int64_t total = c.B * c.H * src.L * (c.row_bytes / W);
  cuda::append_kernel<W><<<blocks_for(total, cuda::kThreads), cuda::kThreads, 0, st>>>(static_cast<char*>(cache), c,
                                                                                       src, starts, counts, flag);
}

template <int W>
void launch_insert(void* cache, const CacheDims& c, const Source& entries, const int64_t* lengths, const int64_t* at,
                   const int32_t* flag, cudaStream_t st) {
  const unsigned blocks = static_cast<unsigned>(c.B * c.H);
  cuda::insert_kernel<W><<<blocks, cuda::kThreads, 0, st>>>(static_cast<char*>(cache), c, entries, lengths, at, flag);
}

template <int W>
void launch_gather(const void* cache, const CacheDims& c, const int64_t* rows, int64_t R, void* out,
                   const int32_t* flag, cudaStream_t st) {
  const int64_t total = R * c.H * c.T * (c.row_bytes / W);
  cuda::gather_kernel<W><<<blocks_for(total, cuda::kThreads), cuda::kThreads, 0, st>>>(
      static_cast<const char*>(cache), c, rows, R, static_cast<char*>(out), flag);
}

// Calls L<W> for the runtime access width.
template <template <int> class L, class... Args>
void by_width(int vec_bytes, Args&&... args) {
  switch (vec_bytes) {
    case 16:
      L<16>::run(args...);
      break;
    case 8:
      L<8>::run(args...);
      break;
    case 4:
      L<4>::run(args...);
      break;
    case 2:
      L<2>::run(args...);
      break;
    default:
      L<1>::run(args...);
  }
}

template <int W>
struct Append {
  template <class... A>
  static void run(A&&... a) {
    launch_append<W>(a...);
  }
};
template <int W>
struct Insert {
  template <class... A>
  static void run(A&&... a) {
    launch_insert<W>(a...);
  }
};
template <int W>
struct Gather {
  template <class... A>
  static void run(A&&... a) {
    launch_gather<W>(a...);
  }
};

}  // namespace

int kv_append_cuda(void* cache, const CacheDims& c, const Source& src, const int64_t* starts, const int64_t* counts,
                   int vec_bytes, int32_t* status, void* stream) {
  if (c.B == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t e = validate(cuda::Check::Append, c.B, starts, counts, src.L, c.T, status, st);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (c.H == 0 || src.L == 0 || c.row_bytes == 0) return 0;
  by_width<Append>(vec_bytes, cache, c, src, starts, counts, status + c.B, st);
  return static_cast<int>(cudaGetLastError());
}

int kv_insert_cuda(void* cache, const CacheDims& c, const Source& entries, const int64_t* lengths, const int64_t* at,
                   int vec_bytes, int32_t* status, void* stream) {
  if (c.B == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t e = validate(cuda::Check::Insert, c.B, lengths, at, entries.L, c.T, status, st);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (c.H == 0 || entries.L == 0 || c.row_bytes == 0) return 0;
  by_width<Insert>(vec_bytes, cache, c, entries, lengths, at, status + c.B, st);
  return static_cast<int>(cudaGetLastError());
}

int kv_gather_rows_cuda(const void* cache, const CacheDims& c, const int64_t* rows, int64_t R, void* out,
                        int vec_bytes, int32_t* status, void* stream) {
  if (R == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t e = validate(cuda::Check::Gather, R, rows, nullptr, c.B, 0, status, st);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (c.H == 0 || c.T == 0 || c.row_bytes == 0) return 0;
  by_width<Gather>(vec_bytes, cache, c, rows, R, out, status + R, st);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cache
}  // namespace mmfm
