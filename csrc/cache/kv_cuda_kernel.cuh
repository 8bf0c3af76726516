// CUDA kernels of the key-value cache ops (contract in cache_kernels.h), on raw pointers.
// Kept apart from the launchers (kv_cuda.cu) so tests/cuda_emu can build them as plain C++
// and run the block logic (the insert's tiled backward shift and its barriers) on a CPU.
//
// Data moves in units of W bytes (W = 16 when the row size, the source strides and the base
// addresses allow: one 128-bit load and store per unit); the unit type is chosen on the host.
//
//   validate_kernel   one block: status[i] per row, status[n] = 1 if any row is bad
//   append_kernel     grid-stride over (row, head, slot, unit) of the source; slots past
//                     counts[b] are skipped
//   insert_kernel     one block per (row, head): the moved slots form one contiguous byte
//                     range, shifted right by N slots in tiles from its end (see below), then
//                     the entries are copied into the gap
//   gather_kernel     grid-stride over (out row, unit) of the output
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cache/cache_kernels.h"
#include "common/cuda_launch.cuh"

#ifndef MMFM_CACHE_CUDA_THREADS
#define MMFM_CACHE_CUDA_THREADS 256
#endif

namespace mmfm {
namespace cache {
namespace cuda {

constexpr int kThreads = MMFM_CACHE_CUDA_THREADS;
constexpr int kUnroll = 4;                    // units each thread holds per insert tile
constexpr int64_t kTile = int64_t(kThreads) * kUnroll;

template <int W>
struct Unit;
template <>
struct Unit<16> {
  using T = uint4;
};
template <>
struct Unit<8> {
  using T = uint2;
};
template <>
struct Unit<4> {
  using T = unsigned int;
};
template <>
struct Unit<2> {
  using T = unsigned short;
};
template <>
struct Unit<1> {
  using T = unsigned char;
};

enum class Check : int { Append = 0, Insert = 1, Gather = 2 };

// a, b: the op's per-row int64 arguments (append: starts, counts or null; insert: lengths,
// at; gather: rows, unused); p1, p2: append L, T; insert N, T; gather B.
__global__ void __launch_bounds__(kThreads) validate_kernel(Check mode, int64_t n, const int64_t* a, const int64_t* b,
                                                            int64_t p1, int64_t p2, int32_t* status) {
  __shared__ int any_bad;
  if (threadIdx.x == 0) any_bad = 0;
  __syncthreads();
  int bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    int32_t s;
    if (mode == Check::Append) {
      s = append_row_status(a[i], b ? b[i] : p1, p1, p2);
    } else if (mode == Check::Insert) {
      s = insert_row_status(a[i], b[i], p1, p2);
    } else {
      s = gather_row_status(a[i], p1);
    }
    status[i] = s;
    bad |= s != kOk;
  }
  if (bad) atomicMax(&any_bad, 1);
  __syncthreads();
  if (threadIdx.x == 0) status[n] = any_bad;
}

template <int W>
__global__ void __launch_bounds__(kThreads) append_kernel(char* cache, CacheDims c, Source src, const int64_t* starts,
                                                          const int64_t* counts, const int32_t* any_bad) {
  if (*any_bad) return;
  using U = typename Unit<W>::T;
  const int64_t row_units = c.row_bytes / W;
  const int64_t total = c.B * c.H * src.L * row_units;
  for (int64_t u = grid_stride_start(); u < total; u += grid_stride_step()) {
    const int64_t v = u % row_units, r = u / row_units;
    const int64_t i = r % src.L, bh = r / src.L;
    const int64_t b = bh / c.H, h = bh % c.H;
    if (counts != nullptr && i >= counts[b]) continue;
    const U* s = reinterpret_cast<const U*>(static_cast<const char*>(src.data) + b * src.sb + h * src.sh + i * src.sl);
    U* d = reinterpret_cast<U*>(cache) + (bh * c.T + starts[b] + i) * row_units;
    d[v] = s[v];
  }
}

// Shift of one (row, head): units [lo, lo + m) move to [lo + delta, lo + m + delta), delta =
// N slots. Destination and source overlap when m > delta, so tiles of kTile units go from the
// end down: every thread loads its units of a tile into registers, the block synchronises,
// then stores them delta units higher. A tile's stores land on units already loaded (its
// own, or the tile above's, which finished loading before the previous barrier), and the
// next tile's loads lie below this tile's stores, so one barrier per tile suffices. The
// entries' stores into the gap [0, delta) need no barrier of their own: every load happened
// before the last tile's barrier, and the tiles' stores all land at or above delta.
template <int W>
__global__ void __launch_bounds__(kThreads) insert_kernel(char* cache, CacheDims c, Source entries,
                                                          const int64_t* lengths, const int64_t* at,
                                                          const int32_t* any_bad) {
  if (*any_bad) return;
  using U = typename Unit<W>::T;
  const int64_t row_units = c.row_bytes / W;
  const int64_t bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int64_t a = at[b], N = entries.L;
  U* gap = reinterpret_cast<U*>(cache) + (bh * c.T + a) * row_units;
  const int64_t m = (lengths[b] - a) * row_units, delta = N * row_units;
  const int64_t t = threadIdx.x;
  for (int64_t e = m; e > 0;) {
    const int64_t s = e > kTile ? e - kTile : 0;
    U held[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = s + t + int64_t(k) * kThreads;
      if (j < e) held[k] = gap[j];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = s + t + int64_t(k) * kThreads;
      if (j < e) gap[j + delta] = held[k];
    }
    e = s;
  }
  const char* src = static_cast<const char*>(entries.data) + b * entries.sb + h * entries.sh;
  for (int64_t u = t; u < delta; u += kThreads) {
    const int64_t i = u / row_units, v = u % row_units;
    gap[u] = reinterpret_cast<const U*>(src + i * entries.sl)[v];
  }
}

template <int W>
__global__ void __launch_bounds__(kThreads) gather_kernel(const char* cache, CacheDims c, const int64_t* rows,
                                                          int64_t R, char* out, const int32_t* any_bad) {
  if (*any_bad) return;
  using U = typename Unit<W>::T;
  const int64_t per_row = c.H * c.T * (c.row_bytes / W);
  const int64_t total = R * per_row;
  const U* in = reinterpret_cast<const U*>(cache);
  U* o = reinterpret_cast<U*>(out);
  for (int64_t u = grid_stride_start(); u < total; u += grid_stride_step()) {
    const int64_t r = u / per_row, off = u % per_row;
    o[u] = in[rows[r] * per_row + off];
  }
}

}  // namespace cuda
}  // namespace cache
}  // namespace mmfm
