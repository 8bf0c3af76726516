// The CUDA key-value cache kernels (csrc/cache/kv_cuda_kernel.cuh) built against the CPU
// stand-in in cuda_runtime.h, behind a C interface for ctypes (tests/test_cache_cuda_emulated.py).
// The tests build it twice: with the production block size (256 threads, kv_cuda_kernel.cuh)
// and with -DMMFM_CACHE_CUDA_THREADS=64 (two warps), where an insert tile is 256 units so small
// shapes already take several tiles; grid-stride kernels get `grid` blocks (the test passes a
// few, so every thread loops). The launch sequence is kv_cuda.cu's: validation
// block, then the copy kernel reading the any-bad flag at status[n].
#include "cuda_runtime.h"
#include "cache/kv_cuda_kernel.cuh"

#include <type_traits>

using namespace mmfm;
using namespace mmfm::cache;

namespace {

template <class F>
void by_width(int w, F&& f) {
  switch (w) {
    case 16:
      f(std::integral_constant<int, 16>());
      break;
    case 8:
      f(std::integral_constant<int, 8>());
      break;
    case 4:
      f(std::integral_constant<int, 4>());
      break;
    case 2:
      f(std::integral_constant<int, 2>());
      break;
    default:
      f(std::integral_constant<int, 1>());
  }
}

void validate(cuda::Check mode, int64_t n, const int64_t* a, const int64_t* b, int64_t p1, int64_t p2,
              int32_t* status) {
  emu::launch(dim3(1), dim3(cuda::kThreads), [&] { cuda::validate_kernel(mode, n, a, b, p1, p2, status); });
}

CacheDims dims(int64_t B, int64_t H, int64_t T, int64_t row_bytes) {
  return CacheDims{B, H, T, row_bytes};
}

Source source(const void* data, int64_t L, int64_t sb, int64_t sh, int64_t sl) {
  return Source{data, L, sb, sh, sl};
}

}  // namespace

extern "C" {

int emu_cache_threads() { return cuda::kThreads; }

void emu_kv_append(void* cache, int64_t B, int64_t H, int64_t T, int64_t row_bytes, const void* src, int64_t L,
                   int64_t sb, int64_t sh, int64_t sl, const int64_t* starts, const int64_t* counts, int vec_bytes,
                   unsigned grid, int32_t* status) {
  const CacheDims c = dims(B, H, T, row_bytes);
  const Source s = source(src, L, sb, sh, sl);
  validate(cuda::Check::Append, B, starts, counts, L, T, status);
  by_width(vec_bytes, [&](auto w) {
    emu::launch(dim3(grid), dim3(cuda::kThreads), [&] {
      cuda::append_kernel<decltype(w)::value>(static_cast<char*>(cache), c, s, starts, counts, status + B);
    });
  });
}

void emu_kv_insert(void* cache, int64_t B, int64_t H, int64_t T, int64_t row_bytes, const void* entries, int64_t N,
                   int64_t sb, int64_t sh, int64_t sl, const int64_t* lengths, const int64_t* at, int vec_bytes,
                   int32_t* status) {
  const CacheDims c = dims(B, H, T, row_bytes);
  const Source s = source(entries, N, sb, sh, sl);
  validate(cuda::Check::Insert, B, lengths, at, N, T, status);
  if (N == 0) return;  // as kv_insert_cuda: nothing moves
  by_width(vec_bytes, [&](auto w) {
    emu::launch(dim3(static_cast<unsigned>(B * H)), dim3(cuda::kThreads), [&] {
      cuda::insert_kernel<decltype(w)::value>(static_cast<char*>(cache), c, s, lengths, at, status + B);
    });
  });
}

void emu_kv_gather_rows(const void* cache, int64_t B, int64_t H, int64_t T, int64_t row_bytes, const int64_t* rows,
                        int64_t R, void* out, int vec_bytes, unsigned grid, int32_t* status) {
  const CacheDims c = dims(B, H, T, row_bytes);
  validate(cuda::Check::Gather, R, rows, nullptr, B, 0, status);
  by_width(vec_bytes, [&](auto w) {
    emu::launch(dim3(grid), dim3(cuda::kThreads), [&] {
      cuda::gather_kernel<decltype(w)::value>(static_cast<const char*>(cache), c, rows, R, static_cast<char*>(out),
                                              status + R);
    });
  });
}

}  // extern "C"
