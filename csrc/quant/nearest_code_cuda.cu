// Nearest-code search on CUDA: a tiled SIMT GEMM whose epilogue folds the scores into a
// running per-row best instead of storing them, so the N x K distance matrix never exists.
//
// Algorithm (same contract as nearest_code_cpu, quant_kernels.h section 1):
//   1. Pre-pass, one thread per row (and per code): ||v||^2 summed serially over D, and
//      for cosine the scale 1 / max(||v||, 1e-12) (IEEE sqrt and division, so
//      --use_fast_math in setup.py does not change it); codes get ||e||^2 of the scaled
//      vector. Rows and codes are scaled on the fly while staging, never copied.
//   2. Search: a block owns a tile of 64 rows and walks its range of 64-code tiles. For
//      each code tile, D is consumed in chunks of 16 staged in shared memory, and each of
//      the 256 threads accumulates a 4 x 4 register tile of dot products (rows ty + 16 i,
//      codes tx + 16 j) in increasing d, the CPU kernel's order (with fmaf, so the last bit
//      may differ from a CPU build that does not contract). The score is ||e||^2 - 2 z.e.
//      Duplicate codes get bit-identical scores, so exact ties really are ties.
//        topk == 1: each thread keeps, per row, the best (score, code) over the codes it
//          sees, which it visits in increasing order, so a strict < keeps the lowest index
//          on ties; at the end the 16 threads of a row reduce by (score, index).
//        topk  > 1: the score tile goes to shared memory; 4 threads per row each scan 16
//          consecutive codes of the tile into a sorted per-thread list (insertion sort,
//          strict <, codes in increasing order, so equal scores stay in index order). At
//          the end the 4 lists of a row are merged by (score, index) with warp shuffles.
//          topk is limited to kMaxTopK (64); larger values return cudaErrorInvalidValue.
//   3. Split-K: when there are too few row tiles to fill the GPU, the code tiles are split
//      into S contiguous ranges (grid.y); each split writes its sorted partial list and a
//      merge kernel folds the S lists per row in split order (strict <, so the lowest
//      index still wins ties). With S == 1 the search writes straight into the outputs.
//   4. Final distance: max(0, ||z||^2 + score).
// Temporaries (norms, scales, split partials) come from cudaMallocAsync on `stream` and
// are freed with cudaFreeAsync on the same stream (cudaMalloc / cudaFree on devices
// without memory pools). Memory beyond the inputs and outputs is O(N + K), plus
// S * N * topk partials when split, which stays small because S > 1 only for small N.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "quant/quant_common.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

constexpr int kBM = 64;        // rows per block tile
constexpr int kBN = 64;        // codes per code tile
constexpr int kBK = 16;        // D chunk staged in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, each a 4 x 4 register tile
constexpr int kMaxTopK = 64;   // per-thread sorted list length for topk > 1
constexpr int kListThreads = 4;  // threads per row that scan a score tile (topk > 1)
constexpr int kMinTilesPerSplit = 4;  // a split walks at least 256 codes

// (1) Squared norm and scale of each row of a [rows, D] buffer; serial over D like the CPU.
__global__ void row_norm_kernel(const void* x, DType dt, int64_t rows, int64_t D, bool cosine, float* scale,
                                float* norm) {
  for (int64_t r = grid_stride_start(); r < rows; r += grid_stride_step()) {
    const int64_t base = r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = load_as_float(x, dt, base + d);
      ss = fmaf(v, v, ss);
    }
    float s = 1.f, n = ss;
    if (cosine) {
      // 1 / max(||x||, 1e-12): a zero vector stays zero. IEEE ops, whatever the math flags.
      s = __fdiv_rn(1.f, fmaxf(__fsqrt_rn(ss), 1e-12f));
      n = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = load_as_float(x, dt, base + d) * s;
        n = fmaf(v, v, n);
      }
    }
    scale[r] = s;
    norm[r] = n;
  }
}

struct SearchArgs {
  const void* z;
  const void* e;
  DType dt;
  int64_t N, K, D;
  bool cosine;
  const float* zscale;   // [N], used when cosine
  const float* escale;   // [K], used when cosine
  const float* enorm;    // [K]
  int64_t row_tiles, code_tiles, tiles_per_split;
  int topk;
  float* out_score;      // [S, N, topk]: score = ||e||^2 - 2 z.e
  int64_t* out_idx;      // [S, N, topk]
};

// (score, index) lexicographic order, used to combine results across threads.
__device__ __forceinline__ bool better(float v, int64_t i, float bv, int64_t bi) {
  return v < bv || (v == bv && i < bi);
}

// Stages rows [first, first + W) x columns [d0, d0 + kBK) of a [n, D] buffer (each row times
// its scale for cosine) into dst[kBK][W + 1], transposed so the compute loop reads a row of
// each; consecutive threads read consecutive d. Out-of-range entries are 0 and add nothing to
// the dot products.
template <int W>
__device__ __forceinline__ void stage(float (*dst)[W + 1], const void* src, DType dt, const float* scale, bool cosine,
                                      int64_t first, int64_t n, int64_t d0, int64_t D, int tid) {
  for (int i = tid; i < W * kBK; i += kThreads) {
    const int m = i / kBK, kk = i % kBK;
    const int64_t r = first + m, d = d0 + kk;
    float v = 0.f;
    if (r < n && d < D) {
      v = load_as_float(src, dt, r * D + d);
      if (cosine) v *= scale[r];
    }
    dst[kk][m] = v;
  }
}

template <bool kTop1>
__global__ void __launch_bounds__(kThreads, 2) search_kernel(SearchArgs a) {
  __shared__ float zs[kBK][kBM + 1];  // +1: the staging writes walk down a column
  __shared__ float es[kBK][kBN + 1];
  __shared__ float sc[kTop1 ? 1 : kBM][kBN + 1];  // score tile, topk > 1 only

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t split = blockIdx.y;
  const int64_t ct_begin = split * a.tiles_per_split;
  const int64_t ct_end = ct_begin + a.tiles_per_split < a.code_tiles ? ct_begin + a.tiles_per_split : a.code_tiles;
  const float inf = __int_as_float(0x7f800000);

  for (int64_t rt = blockIdx.x; rt < a.row_tiles; rt += gridDim.x) {
    const int64_t row0 = rt * kBM;

    // Running state. top-1: per thread, its 4 rows. top-k: per thread, row tid / 4.
    float best[4];
    int64_t best_idx[4];
    float lval[kTop1 ? 1 : kMaxTopK];
    int64_t lidx[kTop1 ? 1 : kMaxTopK];
    if constexpr (kTop1) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        best[i] = inf;
        best_idx[i] = 0;
      }
    } else {
      for (int t = 0; t < a.topk; ++t) {
        lval[t] = inf;
        lidx[t] = 0;
      }
    }

    for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
      const int64_t code0 = ct * kBN;
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

      for (int64_t d0 = 0; d0 < a.D; d0 += kBK) {
        stage<kBM>(zs, a.z, a.dt, a.zscale, a.cosine, row0, a.N, d0, a.D, tid);
        stage<kBN>(es, a.e, a.dt, a.escale, a.cosine, code0, a.K, d0, a.D, tid);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          float av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = zs[kk][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < 4; ++j) bv[j] = es[kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
      }

      if constexpr (kTop1) {
        // This thread's codes, in increasing order: a strict < keeps the lowest index.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t code = code0 + tx + 16 * j;
          if (code < a.K) {
            const float en = a.enorm[code];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float s = en - 2.f * acc[i][j];
              if (s < best[i]) {
                best[i] = s;
                best_idx[i] = code;
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t code = code0 + tx + 16 * j;
          const float en = code < a.K ? a.enorm[code] : 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) sc[ty + 16 * i][tx + 16 * j] = code < a.K ? en - 2.f * acc[i][j] : inf;
        }
        __syncthreads();
        {
          const int r = tid / kListThreads, q = tid % kListThreads;
          constexpr int kPer = kBN / kListThreads;
          for (int jj = 0; jj < kPer; ++jj) {
            const int c = q * kPer + jj;
            const int64_t code = code0 + c;
            if (code >= a.K) break;
            insert_sorted(lval, lidx, a.topk, sc[r][c], code);
          }
        }
        __syncthreads();  // the next tile overwrites sc
      }
    }

    if constexpr (kTop1) {
      // Reduce over the 16 threads (tx) that share rows: they are 16 aligned lanes of a warp.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, best[i], off);
          const int64_t oi = __shfl_xor_sync(0xffffffffu, best_idx[i], off);
          if (better(ov, oi, best[i], best_idx[i])) {
            best[i] = ov;
            best_idx[i] = oi;
          }
        }
        const int64_t row = row0 + ty + 16 * i;
        if (tx == 0 && row < a.N) {
          const int64_t o = split * a.N + row;
          a.out_score[o] = best[i];
          a.out_idx[o] = best_idx[i];
        }
      }
    } else {
      // Merge the kListThreads sorted lists of a row (consecutive lanes) by (score, index,
      // owner): each step the owner of the smallest head advances. Every lane runs topk
      // steps, so the shuffles stay warp-uniform.
      const int r = tid / kListThreads, q = tid % kListThreads;
      const int64_t row = row0 + r;
      int head = 0;
      for (int p = 0; p < a.topk; ++p) {
        float bv = head < a.topk ? lval[head] : inf;
        int64_t bi = head < a.topk ? lidx[head] : INT64_MAX;
        int owner = q;
#pragma unroll
        for (int off = 1; off < kListThreads; off <<= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
          const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
          const int oo = __shfl_xor_sync(0xffffffffu, owner, off);
          if (better(ov, oi, bv, bi) || (ov == bv && oi == bi && oo < owner)) {
            bv = ov;
            bi = oi;
            owner = oo;
          }
        }
        if (owner == q) ++head;
        if (q == 0 && row < a.N) {
          const int64_t o = (split * a.N + row) * a.topk + p;
          a.out_score[o] = bv;
          a.out_idx[o] = bi;
        }
      }
    }
  }
}

// (4) S == 1: the search wrote scores into `dist`; turn them into clamped distances.
__global__ void finalize_kernel(float* dist, const float* znorm, int64_t N, int topk) {
  for (int64_t i = grid_stride_start(); i < N * topk; i += grid_stride_step())
    dist[i] = fmaxf(0.f, znorm[i / topk] + dist[i]);
}

// (3) S > 1: fold the S sorted partial lists of each row, in split order, into one.
__global__ void merge_splits_kernel(const float* part_score, const int64_t* part_idx, const float* znorm, int64_t N,
                                    int topk, int64_t S, int64_t* idx, float* dist) {
  const float inf = __int_as_float(0x7f800000);
  float val[kMaxTopK];
  int64_t id[kMaxTopK];
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) {
    for (int t = 0; t < topk; ++t) {
      val[t] = inf;
      id[t] = 0;
    }
    // Split s covers higher codes than split s - 1 and its list is in (score, index)
    // order, so each candidate's index exceeds that of every equal score already kept.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t o = (s * N + n) * topk;
      for (int t = 0; t < topk; ++t) insert_sorted(val, id, topk, part_score[o + t], part_idx[o + t]);
    }
    for (int t = 0; t < topk; ++t) {
      idx[n * topk + t] = id[t];
      dist[n * topk + t] = fmaxf(0.f, znorm[n] + val[t]);
    }
  }
}

}  // namespace

int nearest_code_cuda(const void* z, const void* codebook, DType dt, int64_t N, int64_t K, int64_t D, int64_t topk,
                      bool cosine, int64_t* idx, float* dist, void* stream) {
  if (N <= 0) return cudaSuccess;
  if (K <= 0 || K > INT32_MAX || D < 0 || topk < 1 || topk > K || topk > kMaxTopK) return cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);

  const int64_t row_tiles = (N + kBM - 1) / kBM, code_tiles = (K + kBN - 1) / kBN;
  // Split the codebook when the row tiles alone cannot fill the GPU (small N, large K).
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms > 0 ? sms : 1);
  int64_t S = 1;
  if (row_tiles < target_blocks) {
    const int64_t want = (target_blocks + row_tiles - 1) / row_tiles;
    const int64_t most = code_tiles / kMinTilesPerSplit > 1 ? code_tiles / kMinTilesPerSplit : 1;
    S = want < most ? want : most;
  }
  const int64_t tiles_per_split = (code_tiles + S - 1) / S;
  S = (code_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  // Temporaries: one allocation, carved into aligned pieces.
  const size_t b_zs = align_up(N * sizeof(float)), b_es = align_up(K * sizeof(float));
  const size_t b_part = S > 1 ? align_up(static_cast<size_t>(S * N * topk) * sizeof(float)) : 0;
  const size_t b_pidx = S > 1 ? align_up(static_cast<size_t>(S * N * topk) * sizeof(int64_t)) : 0;
  Scratch scratch;
  err = scratch.alloc(2 * b_zs + 2 * b_es + b_part + b_pidx, st);
  if (err != cudaSuccess) return err;
  char* buf = static_cast<char*>(scratch.ptr);
  float* zscale = reinterpret_cast<float*>(buf);
  float* znorm = reinterpret_cast<float*>(buf + b_zs);
  float* escale = reinterpret_cast<float*>(buf + 2 * b_zs);
  float* enorm = reinterpret_cast<float*>(buf + 2 * b_zs + b_es);
  float* part_score = S > 1 ? reinterpret_cast<float*>(buf + 2 * b_zs + 2 * b_es) : dist;
  int64_t* part_idx = S > 1 ? reinterpret_cast<int64_t*>(buf + 2 * b_zs + 2 * b_es + b_part) : idx;

  row_norm_kernel<<<blocks_for(N, 256), 256, 0, st>>>(z, dt, N, D, cosine, zscale, znorm);
  row_norm_kernel<<<blocks_for(K, 256), 256, 0, st>>>(codebook, dt, K, D, cosine, escale, enorm);

  SearchArgs a;
  a.z = z;
  a.e = codebook;
  a.dt = dt;
  a.N = N;
  a.K = K;
  a.D = D;
  a.cosine = cosine;
  a.zscale = zscale;
  a.escale = escale;
  a.enorm = enorm;
  a.row_tiles = row_tiles;
  a.code_tiles = code_tiles;
  a.tiles_per_split = tiles_per_split;
  a.topk = static_cast<int>(topk);
  a.out_score = part_score;
  a.out_idx = part_idx;
  const int64_t gx = row_tiles < INT32_MAX ? row_tiles : INT32_MAX;  // grid-stride covers the rest
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(S));
  if (topk == 1)
    search_kernel<true><<<grid, kThreads, 0, st>>>(a);
  else
    search_kernel<false><<<grid, kThreads, 0, st>>>(a);

  if (S == 1)
    finalize_kernel<<<blocks_for(N * topk, 256), 256, 0, st>>>(dist, znorm, N, static_cast<int>(topk));
  else
    merge_splits_kernel<<<blocks_for(N, 128), 128, 0, st>>>(part_score, part_idx, znorm, N, static_cast<int>(topk),
                                                             S, idx, dist);
  err = cudaGetLastError();
  const cudaError_t ferr = scratch.release(st);
  return err != cudaSuccess ? err : ferr;
}

}  // namespace quant
}  // namespace mmfm
