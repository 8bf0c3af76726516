// Lookup-free quantization (binary latents) on CUDA: sign quantization, bit packing, and
// the entropy penalty with its gradient. Same contract as lfq_cpu.cpp (quant_kernels.h
// section 4).
//
// Quantize / indices-to-codes: one thread per row / per element.
//
// Entropy, with s = 4 z / tau and p = sigmoid(s) per element:
//   out[0] = mean_n sum_i Hb(p_ni).  rows_kernel: each block owns a contiguous chunk of
//            rows and writes a double partial; finish_kernel adds the partials in block
//            order. Fixed chunking and fixed trees: deterministic.
//   out[1], factorised (exact = false): sum_i Hb(m_i), m_i = mean_n p_ni. rows_kernel also
//            writes per-block column sums; finish_kernel adds them in block order.
//   out[1], exact (d <= 16): -sum_c a_c log a_c, a_c = mean_n P_n(c) over the C = 2^d codes,
//            P_n(c) = prod_i (bit_i(c) ? p_ni : 1 - p_ni). The code index is split into
//            dlo = min(d, 8) low bits and dhi = d - dlo high bits, so
//            P_n(c) = Lo_n(c_lo) * Hi_n(c_hi). code_partials_kernel: grid (row chunk,
//            range of 16 high values); thread t owns c_lo = t, computes Lo_n(t) itself, reads
//            Hi_n from shared memory, and accumulates its 16 codes per row chunk (fp32 over
//            16-row batches, then fp64). code_mean_kernel adds the chunks in order and forms
//            a_c, -a_c log a_c and the backward weights. Never N x 2^d.
// Backward of g0 * out[0] + g1 * out[1] (g and out live on the device):
//   g0 term: elementwise, g0 * (-s p (1 - p)) / N * 4 / tau.
//   factorised: + g1 * log((1 - m_i) / m_i) * p (1 - p) / N * 4 / tau (m_i clamped).
//   exact: w_c = -(log a_c + 1) / N and, per row, total = sum_c w_c P(c) and
//            on_i = sum_c w_c P(c) bit_i(c); grad += g1 * (on_i - p_i total) * 4 / tau.
//            grad_exact_kernel: a block takes 2 rows at a time; thread t owns c_lo = t and
//            loops over the high values: x = w_c Hi(c_hi), T += x, O_j += x bit_j(c_hi);
//            then total = sum_t Lo(t) T, on_i = sum_t Lo(t) T bit_i(t) for low bits and
//            sum_t Lo(t) O_j for high bits, reduced with fixed warp and block trees.
// Numerics: sigmoid, softplus and logs in double (setup.py's --use_fast_math only touches
// fp32 math), IEEE divisions via __fdiv_rn. Results agree with the CPU kernel to rounding.
// The workspace (lfq_entropy_workspace_floats) holds the partials; nothing is allocated.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "quant/quant_common.h"
#include "quant/quant_kernels.h"

namespace mmfm {
namespace quant {
namespace {

constexpr int kThreads = 256;
constexpr int kFinishThreads = 1024;
constexpr int kMaxRowBlocks = 1024;   // rows_kernel blocks (chunks of rows)
constexpr int kCodeBatch = 16;        // rows per shared-memory batch in code_partials_kernel
constexpr int kHiPerBlock = 16;       // high values (codes per thread) in code_partials_kernel
constexpr int kGradRows = 2;          // rows per step of grad_exact_kernel
constexpr int kMaxExactBits = 16;
constexpr int kLoBits = 8;            // low bits owned by threads: 2^8 = 256 = kThreads
constexpr int64_t kMaxCodePartials = int64_t(1) << 21;  // doubles in the per-chunk code sums

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Workspace layout, in doubles. The same function sizes it and carves it, so the binding's
// allocation (lfq_entropy_workspace_floats) and the kernels agree.
struct Layout {
  int64_t row_blocks, rows_per_block;          // rows_kernel
  int64_t code_chunks, rows_per_chunk;         // code_partials_kernel (exact)
  int64_t C, dlo, dhi;
  int64_t sample_part, col_part, m, cpart, a, term, w, total;  // offsets (doubles)
};

Layout make_layout(int64_t N, int64_t d, bool exact) {
  Layout l{};
  l.row_blocks = clamp64(ceil_div(N, kThreads), 1, kMaxRowBlocks);
  l.rows_per_block = ceil_div(N, l.row_blocks);
  int64_t off = 0;
  l.sample_part = off;
  off += l.row_blocks;
  l.col_part = off;
  off += l.row_blocks * d;
  l.m = off;
  off += d;
  if (exact) {
    l.C = int64_t(1) << d;
    l.dlo = d < kLoBits ? d : kLoBits;
    l.dhi = d - l.dlo;
    const int64_t most = kMaxCodePartials / l.C > 1 ? kMaxCodePartials / l.C : 1;
    l.code_chunks = clamp64(ceil_div(N, 128), 1, most < kMaxRowBlocks ? most : kMaxRowBlocks);
    l.rows_per_chunk = ceil_div(N, l.code_chunks);
    l.cpart = off;
    off += l.code_chunks * l.C;
    l.a = off;
    off += l.C;
    l.term = off;
    off += l.C;
    l.w = off;  // C floats
    off += (l.C + 1) / 2;
  }
  l.total = off;
  return l;
}

// ---- scalar helpers (double, unaffected by --use_fast_math) ----------------------------
__device__ __forceinline__ double sigmoid_d(double s) { return 1.0 / (1.0 + exp(-s)); }
__device__ __forceinline__ double softplus_d(double x) { return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x)); }
// Binary entropy of sigmoid(s), stable for large |s|.
__device__ __forceinline__ double binary_entropy_logit(double s) {
  const double p = sigmoid_d(s);
  return p * softplus_d(-s) + (1.0 - p) * softplus_d(s);
}
__device__ __forceinline__ double binary_entropy(double p) {
  double h = 0.0;
  if (p > 0.0) h -= p * log(p);
  if (p < 1.0) h -= (1.0 - p) * log(1.0 - p);
  return h;
}
// s = 4 z / tau, as the CPU kernel computes it (IEEE division).
__device__ __forceinline__ float logit(float z, float tau) { return __fdiv_rn(4.f * z, tau); }
__device__ __forceinline__ float bit_prob(float z, float tau) {
  return static_cast<float>(sigmoid_d(static_cast<double>(logit(z, tau))));
}

// Adds red[0, T) into red[0] over a fixed tree (deterministic). Every thread of the block
// calls it after writing its own red[t]; the first barrier publishes those writes.
template <int T>
__device__ __forceinline__ void tree_sum(double* red) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int w = T / 2; w > 0; w >>= 1) {
    if (t < w) red[t] += red[t + w];
    __syncthreads();
  }
}

// ---- quantize ---------------------------------------------------------------------------
__global__ void lfq_quantize_kernel(const void* z, DType dt, int64_t N, int64_t d, float* codes, int64_t* idx) {
  for (int64_t n = grid_stride_start(); n < N; n += grid_stride_step()) idx[n] = lfq_quantize_row(z, dt, n, d, codes);
}

__global__ void lfq_indices_to_codes_kernel(const int64_t* idx, int64_t N, int64_t d, float* codes) {
  for (int64_t k = grid_stride_start(); k < N * d; k += grid_stride_step()) {
    const int64_t n = k / d, i = k % d;
    codes[k] = lfq_bit_code(idx[n], i);
  }
}

// ---- entropy: per-row-chunk partials ----------------------------------------------------
// Block b owns rows [b * rpb, (b + 1) * rpb). Thread t reads column t % d of rows
// t / d, t / d + G, ... (G = kThreads / d groups), so a warp reads contiguous memory.
// Writes sample_part[b] = sum Hb and col_part[b * d + i] = sum_n p_ni (doubles).
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const float* z, int64_t N, int64_t d, float tau, int64_t rows_per_block, double* sample_part,
                double* col_part) {
  __shared__ double col[kThreads];
  __shared__ double red[kThreads];
  const int t = threadIdx.x;
  const int64_t groups = kThreads / d, g = t / d, i = t % d;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  double hsum = 0.0, psum = 0.0;
  if (g < groups) {
    for (int64_t n = r0 + g; n < r1; n += groups) {
      const float s = logit(z[n * d + i], tau);
      hsum += binary_entropy_logit(static_cast<double>(s));
      psum += sigmoid_d(static_cast<double>(s));
    }
  }
  col[t] = psum;
  red[t] = hsum;
  tree_sum<kThreads>(red);
  if (t == 0) sample_part[blockIdx.x] = red[0];
  if (t < d) {
    double s = 0.0;
    for (int64_t gg = 0; gg < groups; ++gg) s += col[gg * d + t];
    col_part[blockIdx.x * d + t] = s;
  }
}

// One block. Adds the per-chunk partials in chunk order: out[0] (when out != nullptr),
// the factorised means m (always) and out[1] from them (factorised), or out[1] as the sum
// of the exact per-code terms (exact).
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const double* sample_part, const double* col_part, int64_t row_blocks, int64_t N, int64_t d,
                  bool exact, const double* term, int64_t C, double* m, float* out) {
  __shared__ double red[kFinishThreads];
  const int t = threadIdx.x;
  const double invN = 1.0 / static_cast<double>(N);
  // out[0]
  double acc = 0.0;
  for (int64_t b = t; b < row_blocks; b += kFinishThreads) acc += sample_part[b];
  red[t] = acc;
  tree_sum<kFinishThreads>(red);
  if (t == 0 && out != nullptr) out[0] = static_cast<float>(red[0] * invN);
  __syncthreads();
  if (!exact) {
    if (t < d) {
      double s = 0.0;
      for (int64_t b = 0; b < row_blocks; ++b) s += col_part[b * d + t];
      m[t] = s * invN;
    }
    __syncthreads();
    if (t == 0 && out != nullptr) {
      // As the CPU kernel: Hb of the fp32-rounded mean, summed in double in bit order.
      double h = 0.0;
      for (int64_t i = 0; i < d; ++i) h += binary_entropy(static_cast<double>(static_cast<float>(m[i])));
      out[1] = static_cast<float>(h);
    }
  } else {
    acc = 0.0;
    for (int64_t c = t; c < C; c += kFinishThreads) acc += term[c];
    red[t] = acc;
    tree_sum<kFinishThreads>(red);
    if (t == 0 && out != nullptr) out[1] = static_cast<float>(red[0]);
  }
}

// Exact: cpart[b * C + c] = sum over the rows of chunk b of P_n(c), for the codes whose
// high part lies in [blockIdx.y * kHiPerBlock, +kHiPerBlock). Thread t owns c_lo = t.
__global__ void __launch_bounds__(kThreads)
    code_partials_kernel(const float* z, int64_t N, int64_t d, float tau, int64_t dlo, int64_t rows_per_chunk,
                         double* cpart) {
  __shared__ float p[kCodeBatch][kMaxExactBits];
  __shared__ float hi_prob[kCodeBatch][kHiPerBlock];
  const int t = threadIdx.x;
  const int64_t dhi = d - dlo, Clo = int64_t(1) << dlo, Chi = int64_t(1) << dhi, C = Clo * Chi;
  const int64_t hi0 = static_cast<int64_t>(blockIdx.y) * kHiPerBlock;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  float accf[kHiPerBlock];
  double accd[kHiPerBlock];
#pragma unroll
  for (int k = 0; k < kHiPerBlock; ++k) {
    accf[k] = 0.f;
    accd[k] = 0.0;
  }
  for (int64_t b0 = r0; b0 < r1; b0 += kCodeBatch) {
    for (int e = t; e < kCodeBatch * d; e += kThreads) {
      const int64_t r = e / d, i = e % d, n = b0 + r;
      p[r][i] = n < r1 ? bit_prob(z[n * d + i], tau) : 0.f;
    }
    __syncthreads();
    for (int e = t; e < kCodeBatch * kHiPerBlock; e += kThreads) {
      const int r = e / kHiPerBlock, k = e % kHiPerBlock;
      const int64_t hi = hi0 + k;
      float v = 0.f;  // rows past the chunk and high values past Chi contribute nothing
      if (b0 + r < r1 && hi < Chi) {
        v = 1.f;
        for (int64_t j = 0; j < dhi; ++j) v *= ((hi >> j) & 1) ? p[r][dlo + j] : 1.f - p[r][dlo + j];
      }
      hi_prob[r][k] = v;
    }
    __syncthreads();
    if (t < Clo) {
      for (int r = 0; r < kCodeBatch; ++r) {
        float lo = 1.f;
        for (int64_t i = 0; i < dlo; ++i) lo *= ((t >> i) & 1) ? p[r][i] : 1.f - p[r][i];
#pragma unroll
        for (int k = 0; k < kHiPerBlock; ++k) accf[k] = fmaf(lo, hi_prob[r][k], accf[k]);
      }
#pragma unroll
      for (int k = 0; k < kHiPerBlock; ++k) {
        accd[k] += accf[k];
        accf[k] = 0.f;
      }
    }
    __syncthreads();  // the next batch overwrites p and hi_prob
  }
  if (t < Clo) {
#pragma unroll
    for (int k = 0; k < kHiPerBlock; ++k) {
      const int64_t hi = hi0 + k;
      if (hi < Chi) cpart[blockIdx.x * C + hi * Clo + t] = accd[k];
    }
  }
}

// Exact: a_c = mean_n P_n(c) (chunks added in order), term_c = -a_c log a_c and the
// backward weight w_c = -(log a_c + 1) / N (fp32, as the CPU kernel).
__global__ void code_mean_kernel(const double* cpart, int64_t chunks, int64_t C, int64_t N, double* a, double* term,
                                 float* w) {
  const float invN = __fdiv_rn(1.f, static_cast<float>(N));
  for (int64_t c = grid_stride_start(); c < C; c += grid_stride_step()) {
    double s = 0.0;
    for (int64_t b = 0; b < chunks; ++b) s += cpart[b * C + c];
    const double v = s / static_cast<double>(N);
    a[c] = v;
    term[c] = v > 0.0 ? -v * log(v) : 0.0;
    w[c] = v > 0.0 ? static_cast<float>(-(log(v) + 1.0)) * invN : 0.f;
  }
}

// Gradient, factorised form (and the g0 term); elementwise.
__global__ void grad_factorised_kernel(const float* z, int64_t N, int64_t d, float tau, const float* g,
                                       const double* m, bool with_codebook, float* grad) {
  const float g0 = g[0], g1 = g[1], ds_dz = __fdiv_rn(4.f, tau), invN = __fdiv_rn(1.f, static_cast<float>(N));
  for (int64_t k = grid_stride_start(); k < N * d; k += grid_stride_step()) {
    const float s = logit(z[k], tau);
    const float p = static_cast<float>(sigmoid_d(static_cast<double>(s)));
    float gz = g0 * (-s * p * (1.f - p)) * invN * ds_dz;  // d Hb(sigmoid(s)) / ds = -s p (1 - p)
    if (with_codebook && g1 != 0.f) {
      double mi = m[k % d];
      mi = mi < 1e-12 ? 1e-12 : (mi > 1.0 - 1e-12 ? 1.0 - 1e-12 : mi);
      gz += g1 * static_cast<float>(log((1.0 - mi) / mi)) * p * (1.f - p) * invN * ds_dz;
    }
    grad[k] = gz;
  }
}

// Gradient, exact form: kGradRows rows per step; see the header comment.
__global__ void __launch_bounds__(kThreads)
    grad_exact_kernel(const float* z, int64_t N, int64_t d, float tau, const float* g, const float* w, int64_t dlo,
                      float* grad) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kQ = kGradRows * (kMaxExactBits + 1);  // reduced quantities per step
  __shared__ float p[kGradRows][kMaxExactBits];
  __shared__ float hi_prob[kGradRows][1 << (kMaxExactBits - kLoBits)];
  __shared__ double warp_part[kWarps][kQ];
  __shared__ double reduced[kQ];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t dhi = d - dlo, Clo = int64_t(1) << dlo, Chi = int64_t(1) << dhi;
  const int64_t q_per_row = d + 1;  // total, then on_i for each bit
  const float g0 = g[0], g1 = g[1], ds_dz = __fdiv_rn(4.f, tau), invN = __fdiv_rn(1.f, static_cast<float>(N));
  const int64_t steps = (N + kGradRows - 1) / kGradRows;

  for (int64_t step = blockIdx.x; step < steps; step += gridDim.x) {
    const int64_t n0 = step * kGradRows;
    for (int e = t; e < kGradRows * d; e += kThreads) {
      const int64_t r = e / d, i = e % d, n = n0 + r;
      p[r][i] = n < N ? bit_prob(z[n * d + i], tau) : 0.5f;
    }
    __syncthreads();
    if (g1 != 0.f) {  // uniform: g1 is the same for every thread
      for (int64_t e = t; e < kGradRows * Chi; e += kThreads) {
        const int64_t r = e / Chi, hi = e % Chi;
        float v = 1.f;
        for (int64_t j = 0; j < dhi; ++j) v *= ((hi >> j) & 1) ? p[r][dlo + j] : 1.f - p[r][dlo + j];
        hi_prob[r][hi] = v;
      }
      __syncthreads();
      double lo[kGradRows], T[kGradRows], O[kGradRows][kMaxExactBits - kLoBits];
#pragma unroll
      for (int r = 0; r < kGradRows; ++r) {
        lo[r] = 0.0;
        T[r] = 0.0;
#pragma unroll
        for (int j = 0; j < kMaxExactBits - kLoBits; ++j) O[r][j] = 0.0;
      }
      if (t < Clo) {
#pragma unroll
        for (int r = 0; r < kGradRows; ++r) {
          float l = 1.f;
          for (int64_t i = 0; i < dlo; ++i) l *= ((t >> i) & 1) ? p[r][i] : 1.f - p[r][i];
          lo[r] = l;
        }
        for (int64_t hi = 0; hi < Chi; ++hi) {
          const double wc = w[hi * Clo + t];
#pragma unroll
          for (int r = 0; r < kGradRows; ++r) {
            const double x = wc * static_cast<double>(hi_prob[r][hi]);
            T[r] += x;
#pragma unroll
            for (int j = 0; j < kMaxExactBits - kLoBits; ++j)
              if (j < dhi && ((hi >> j) & 1)) O[r][j] += x;
          }
        }
      }
      // Per-thread contributions to each quantity, reduced over the warp (fixed xor tree)
      // and then over the warps in order.
#pragma unroll
      for (int r = 0; r < kGradRows; ++r) {
        for (int64_t q = 0; q < q_per_row; ++q) {
          double v;
          if (q == 0) {
            v = lo[r] * T[r];
          } else if (q - 1 < dlo) {
            v = ((t >> (q - 1)) & 1) ? lo[r] * T[r] : 0.0;
          } else {
            v = 0.0;
            const int64_t j = q - 1 - dlo;
#pragma unroll
            for (int jj = 0; jj < kMaxExactBits - kLoBits; ++jj)
              if (jj == j) v = lo[r] * O[r][jj];
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
          if (lane == 0) warp_part[warp][r * q_per_row + q] = v;
        }
      }
      __syncthreads();
      for (int64_t q = t; q < kGradRows * q_per_row; q += kThreads) {
        double s = 0.0;
        for (int ww = 0; ww < kWarps; ++ww) s += warp_part[ww][q];
        reduced[q] = s;
      }
      __syncthreads();
    }
    for (int e = t; e < kGradRows * d; e += kThreads) {
      const int64_t r = e / d, i = e % d, n = n0 + r;
      if (n < N) {
        const float s = logit(z[n * d + i], tau), pi = p[r][i];
        float gz = g0 * (-s * pi * (1.f - pi)) * invN * ds_dz;
        if (g1 != 0.f) {
          const double total = reduced[r * q_per_row], on = reduced[r * q_per_row + 1 + i];
          gz += g1 * static_cast<float>(on - static_cast<double>(pi) * total) * ds_dz;
        }
        grad[n * d + i] = gz;
      }
    }
    __syncthreads();  // the next step overwrites p, hi_prob and reduced
  }
}

bool valid_entropy_args(int64_t N, int64_t d, bool exact) {
  return N >= 1 && d >= 1 && d <= 62 && (!exact || d <= kMaxExactBits);
}

}  // namespace

int lfq_quantize_cuda(const void* z, DType dt, int64_t N, int64_t d, float* codes, int64_t* idx, void* stream) {
  if (N <= 0) return cudaSuccess;
  if (d < 1 || d > 62) return cudaErrorInvalidValue;
  lfq_quantize_kernel<<<blocks_for(N, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(z, dt, N, d, codes,
                                                                                                   idx);
  return cudaGetLastError();
}

int lfq_indices_to_codes_cuda(const int64_t* idx, int64_t N, int64_t d, float* codes, void* stream) {
  if (N <= 0) return cudaSuccess;
  if (d < 1 || d > 62) return cudaErrorInvalidValue;
  lfq_indices_to_codes_kernel<<<blocks_for(N * d, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      idx, N, d, codes);
  return cudaGetLastError();
}

int64_t lfq_entropy_workspace_floats(int64_t N, int64_t d, bool exact) {
  if (!valid_entropy_args(N, d, exact)) return 2;
  return 2 * make_layout(N, d, exact).total + 2;  // doubles -> floats, plus slack
}

int lfq_entropy_cuda(const float* z, int64_t N, int64_t d, float tau, bool exact, float* out, float* workspace,
                     void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (N <= 0) return cudaMemsetAsync(out, 0, 2 * sizeof(float), st);
  if (!valid_entropy_args(N, d, exact) || !(tau > 0.f)) return cudaErrorInvalidValue;
  const Layout l = make_layout(N, d, exact);
  double* ws = reinterpret_cast<double*>(workspace);  // the binding's allocation is 256-byte aligned
  rows_kernel<<<static_cast<unsigned>(l.row_blocks), kThreads, 0, st>>>(z, N, d, tau, l.rows_per_block,
                                                                         ws + l.sample_part, ws + l.col_part);
  if (exact) {
    const dim3 grid(static_cast<unsigned>(l.code_chunks), static_cast<unsigned>(ceil_div(int64_t(1) << l.dhi, kHiPerBlock)));
    code_partials_kernel<<<grid, kThreads, 0, st>>>(z, N, d, tau, l.dlo, l.rows_per_chunk, ws + l.cpart);
    code_mean_kernel<<<blocks_for(l.C, kThreads), kThreads, 0, st>>>(ws + l.cpart, l.code_chunks, l.C, N, ws + l.a,
                                                                     ws + l.term, reinterpret_cast<float*>(ws + l.w));
  }
  finish_kernel<<<1, kFinishThreads, 0, st>>>(ws + l.sample_part, ws + l.col_part, l.row_blocks, N, d, exact,
                                              exact ? ws + l.term : nullptr, exact ? l.C : 0, ws + l.m, out);
  return cudaGetLastError();
}

int lfq_entropy_backward_cuda(const float* z, int64_t N, int64_t d, float tau, bool exact, const float* g,
                              float* grad_z, float* workspace, void* stream) {
  if (N <= 0) return cudaSuccess;
  if (!valid_entropy_args(N, d, exact) || !(tau > 0.f)) return cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Layout l = make_layout(N, d, exact);
  double* ws = reinterpret_cast<double*>(workspace);
  if (!exact) {
    rows_kernel<<<static_cast<unsigned>(l.row_blocks), kThreads, 0, st>>>(z, N, d, tau, l.rows_per_block,
                                                                           ws + l.sample_part, ws + l.col_part);
    finish_kernel<<<1, kFinishThreads, 0, st>>>(ws + l.sample_part, ws + l.col_part, l.row_blocks, N, d, false,
                                                nullptr, 0, ws + l.m, nullptr);
    grad_factorised_kernel<<<blocks_for(N * d, kThreads), kThreads, 0, st>>>(z, N, d, tau, g, ws + l.m, true, grad_z);
    return cudaGetLastError();
  }
  // The weights need a_c whatever g1 is; the kernels read g on the device, so the host
  // cannot skip them when g1 == 0 without a synchronisation (grad_exact_kernel skips its
  // code loop then).
  const dim3 grid(static_cast<unsigned>(l.code_chunks), static_cast<unsigned>(ceil_div(int64_t(1) << l.dhi, kHiPerBlock)));
  code_partials_kernel<<<grid, kThreads, 0, st>>>(z, N, d, tau, l.dlo, l.rows_per_chunk, ws + l.cpart);
  code_mean_kernel<<<blocks_for(l.C, kThreads), kThreads, 0, st>>>(ws + l.cpart, l.code_chunks, l.C, N, ws + l.a,
                                                                   ws + l.term, reinterpret_cast<float*>(ws + l.w));
  const int64_t steps = ceil_div(N, kGradRows);
  const unsigned blocks = static_cast<unsigned>(steps < 4096 ? steps : 4096);
  grad_exact_kernel<<<blocks, kThreads, 0, st>>>(z, N, d, tau, g, reinterpret_cast<const float*>(ws + l.w), l.dlo,
                                                grad_z);
  return cudaGetLastError();
}

}  // namespace quant
}  // namespace mmfm
