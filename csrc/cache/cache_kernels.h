// Raw-pointer entry points of the key-value cache ops (csrc/cache): append new entries at
// per-row slots, insert N entries after a per-row prefix, gather whole rows.
//
// A cache is one layer's keys or values, [B, H, T, D] contiguous (T = capacity in slots); a
// slot of head h of row b is D elements, `row_bytes` = D * element size. The ops only move
// bytes, so one kernel serves fp32, bf16 and fp16 (and no value is ever converted).
// Sources (`new`, `entries`) are [B, H, L, D] with any strides for B, H and L (in bytes here)
// and unit stride along D, so the transposed keys a model computes need no copy.
//
// Every op validates all its rows first and writes nothing when one is bad: `status` [B]
// (int32, one code per row) is filled, and on CUDA status[B] says whether any row is bad and
// the copy kernels read it before touching memory (all-or-nothing without a host round trip
// between validation and copy). The binding (csrc/cache/cache_binding.cpp) turns the first
// bad row into an error naming the argument.
//
// `*_cpu` are in kv_cpu.cpp (memcpy/memmove per slot run, OpenMP over (row, head) pairs when
// there is enough to copy); `*_cuda` in kv_cuda.cu (kernels in kv_cuda_kernel.cuh), launched
// on `stream` (a cudaStream_t passed as void*), returning a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace mmfm {
namespace cache {

enum Status : int32_t {
  kOk = 0,
  kBadStart = 1,      // kv_append: starts[b] < 0
  kBadCount = 2,      // kv_append: counts[b] outside [0, L]
  kOverCapacity = 3,  // kv_append: starts + counts > T; kv_insert: lengths + N > T
  kBadLength = 4,     // kv_insert: lengths[b] outside [0, T]
  kBadAt = 5,         // kv_insert: at[b] outside [0, lengths[b]]
  kBadRow = 6,        // kv_gather_rows: rows[r] outside [0, B)
};

// Row checks shared by the CPU kernels, the CUDA validation kernel and (in words) the Python
// reference. `counts` may be absent (every row appends all L).
MMFM_HD int32_t append_row_status(int64_t start, int64_t count, int64_t L, int64_t T) {
  if (start < 0) return kBadStart;
  if (count < 0 || count > L) return kBadCount;
  if (start > T - count) return kOverCapacity;  // start + count > T without overflow
  return kOk;
}
MMFM_HD int32_t insert_row_status(int64_t length, int64_t at, int64_t N, int64_t T) {
  if (length < 0 || length > T) return kBadLength;
  if (at < 0 || at > length) return kBadAt;
  if (length > T - N) return kOverCapacity;
  return kOk;
}
MMFM_HD int32_t gather_row_status(int64_t row, int64_t B) { return (row < 0 || row >= B) ? kBadRow : kOk; }

// Geometry of a cache and of a strided source.
struct CacheDims {
  int64_t B = 0, H = 0, T = 0;
  int64_t row_bytes = 0;  // D * element size
};
struct Source {
  const void* data = nullptr;
  int64_t L = 0;                 // slots per (row, head)
  int64_t sb = 0, sh = 0, sl = 0;  // byte strides of the B, H and L dims
};

// cache[b, h, starts[b] + i] = src[b, h, i] for i < counts[b] (counts null: all L).
// Returns the number of bad rows (0: the cache was written).
int64_t kv_append_cpu(void* cache, const CacheDims& c, const Source& src, const int64_t* starts,
                      const int64_t* counts, int32_t* status);
// Per (b, h): slots [at[b], lengths[b]) move to [at[b] + N, lengths[b] + N) (memmove: the
// ranges overlap), then entries[b, h, 0:N] fill [at[b], at[b] + N). N = entries.L.
int64_t kv_insert_cpu(void* cache, const CacheDims& c, const Source& entries, const int64_t* lengths,
                      const int64_t* at, int32_t* status);
// out[r] = cache[rows[r]] for r < R (out is [R, H, T, D] contiguous).
int64_t kv_gather_rows_cpu(const void* cache, const CacheDims& c, const int64_t* rows, int64_t R, void* out,
                           int32_t* status);

// `status` is device memory of B + 1 (gather: R + 1) int32. `vec_bytes` (2, 4, 8 or 16) is the
// widest access that divides row_bytes, every source stride and every base address; the
// binding computes it (vec_bytes_for).
int kv_append_cuda(void* cache, const CacheDims& c, const Source& src, const int64_t* starts, const int64_t* counts,
                   int vec_bytes, int32_t* status, void* stream);
int kv_insert_cuda(void* cache, const CacheDims& c, const Source& entries, const int64_t* lengths, const int64_t* at,
                   int vec_bytes, int32_t* status, void* stream);
int kv_gather_rows_cuda(const void* cache, const CacheDims& c, const int64_t* rows, int64_t R, void* out,
                        int vec_bytes, int32_t* status, void* stream);

// The widest access size in {16, 8, 4, 2, 1} bytes dividing every value given (sizes, strides
// and addresses as integers).
inline int vec_bytes_for(const int64_t* values, int n) {
  int w = 16;
  for (int i = 0; i < n; ++i) {
    while (w > 1 && values[i] % w != 0) w /= 2;
  }
  return w;
}

}  // namespace cache
}  // namespace mmfm
