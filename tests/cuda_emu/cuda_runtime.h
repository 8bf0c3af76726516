// A CPU stand-in for the small part of CUDA that the sampling, cache and quantization kernels
// use, so that their block-level logic (reductions, scans, bisection, shared-memory sort,
// draws, tiled shifts, tiled GEMMs, barriers) can be tested on a machine without a GPU.
// Compiled as plain C++ instead of the real <cuda_runtime.h> (the tests/test_*_cuda_emulated.py
// files put this folder first on the include path; tests/emu_build.py turns the .cu files'
// `kernel<<<grid, block, ...>>>(args)` launches into emu::launch calls). Not a simulator of
// timing or memory: each thread of a block is a ucontext fiber, run cooperatively;
// __syncthreads() and the warp shuffles are barriers at which fibers yield. Blocks run one
// after another (x fastest, then y), so `__shared__` can be a function-local static. A barrier
// that not every live thread of the block (or warp) reaches aborts with "deadlock". A launch
// configuration CUDA would refuse (an empty grid, a block not a multiple of 32 threads or
// over 1024) runs nothing and leaves cudaErrorInvalidConfiguration for cudaGetLastError.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// __device__ functions defined in headers (sampling_cuda.cuh) are included by several .cu files;
// nvcc keeps device code per translation unit, so here they must be inline to link as one
// library (and __forceinline__, which always follows __device__, adds nothing).
#define __global__
#define __device__ inline
#define __host__
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
             cudaErrorNotSupported = 801 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
namespace emu {
inline cudaError_t& last_error() {
  static cudaError_t e = 0;
  return e;
}
// The multiprocessor count the launchers see (launch heuristics such as nearest_code's
// split-K read it); tests set it through emu_set_sms to reach both sides of a heuristic.
inline int& sm_count() {
  static int n = 132;
  return n;
}
}  // namespace emu
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = 0;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return 0;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sm_count() : 0;
  return 0;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return 0;
}
// Host allocation stand-ins, so csrc/common/cuda_launch.cuh (Scratch) compiles here.
inline cudaError_t cudaMalloc(void** p, size_t n) { return (*p = std::malloc(n)) != nullptr ? 0 : 2; }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return 0;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
// The vector types the copy kernels move (16 and 8 bytes, aligned like CUDA's).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

namespace emu {

enum State { kRunnable = 0, kAtBlockBarrier = 1, kAtWarpBarrier = 2, kDone = 3 };

// A fiber starts on its own stack through makecontext/swapcontext; after that, switches use
// _setjmp/_longjmp, which (unlike swapcontext) do not save the signal mask with a system call.
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  State state = kRunnable;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf scheduler_jb;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> exchange;  // one slot per thread for the shuffles
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
// threadIdx, blockIdx, blockDim and gridDim of the thread running now (one block runs at a time).
struct Coords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
inline Coords& coords() {
  static Coords c;
  return c;
}

inline void yield(State s) {
  Block& b = *block();
  Fiber& f = b.fibers[b.current];
  f.state = s;
  if (_setjmp(f.jb) == 0) _longjmp(b.scheduler_jb, 1);
}

inline void fiber_entry() {
  Block& b = *block();
  (*b.body)();
  b.fibers[b.current].state = kDone;
  _longjmp(b.scheduler_jb, 1);
}

inline void resume(Block& b, int i) {
  Fiber& f = b.fibers[i];
  if (_setjmp(b.scheduler_jb) != 0) return;  // back from the fiber
  if (!f.started) {
    f.started = true;
    swapcontext(&b.scheduler, &f.ctx);  // first entry: onto the fiber's own stack
  } else {
    _longjmp(f.jb, 1);
  }
}

// Runs `body` as one block of n threads (n a multiple of 32).
inline void run_block(int n, const std::function<void()>& body) {
  Block b;
  b.body = &body;
  b.fibers.resize(n);
  b.exchange.assign(n, 0);
  block() = &b;
  static std::vector<std::vector<char>> stacks;  // reused by every block
  if (stacks.size() < static_cast<size_t>(n)) stacks.resize(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    stacks[i].resize(128 << 10);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i].data();
    f.ctx.uc_stack.ss_size = stacks[i].size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].state != kRunnable) continue;
      b.current = i;
      coords().thread_idx.x = static_cast<unsigned>(i);
      resume(b, i);
    }
    int live = 0, at_block = 0;
    for (const Fiber& f : b.fibers) {
      live += f.state != kDone;
      at_block += f.state == kAtBlockBarrier;
    }
    if (live == 0) break;
    bool released = false;
    for (int w = 0; w < n / 32; ++w) {  // warps whose live lanes all wait at a warp barrier
      int lv = 0, at = 0;
      for (int l = 0; l < 32; ++l) {
        lv += b.fibers[32 * w + l].state != kDone;
        at += b.fibers[32 * w + l].state == kAtWarpBarrier;
      }
      if (lv > 0 && at == lv) {
        for (int l = 0; l < 32; ++l)
          if (b.fibers[32 * w + l].state == kAtWarpBarrier) b.fibers[32 * w + l].state = kRunnable;
        released = true;
      }
    }
    if (!released && at_block == live) {
      for (Fiber& f : b.fibers)
        if (f.state == kAtBlockBarrier) f.state = kRunnable;
      released = true;
    }
    if (!released) {
      std::fprintf(stderr, "cuda_emu: deadlock: threads wait at different barriers (block %u)\n", coords().block_idx.x);
      std::abort();
    }
  }
  block() = nullptr;
}

// Runs kernel_call() for every block of the grid (1D blocks; 1D or 2D grids).
template <class F>
void launch(dim3 grid, dim3 threads, F&& kernel_call) {
  if (grid.x == 0 || grid.y == 0 || grid.z != 1 || threads.y != 1 || threads.z != 1 || threads.x == 0 ||
      threads.x % 32 != 0 || threads.x > 1024) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const std::function<void()> body = kernel_call;
  coords().grid_dim = grid;
  coords().block_dim = threads;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      coords().block_idx = dim3(x, y);
      run_block(static_cast<int>(threads.x), body);
    }
}

}  // namespace emu

#define threadIdx (::emu::coords().thread_idx)
#define blockIdx (::emu::coords().block_idx)
#define blockDim (::emu::coords().block_dim)
#define gridDim (::emu::coords().grid_dim)

inline void __syncthreads() { emu::yield(emu::kAtBlockBarrier); }

template <class T>
T emu_shuffle(T v, int src_lane_xor, int up) {
  emu::Block& b = *emu::block();
  const int t = static_cast<int>(threadIdx.x), lane = t & 31;
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  b.exchange[t] = u;
  emu::yield(emu::kAtWarpBarrier);
  int src = t;
  if (up < 0) src = (t & ~31) | (lane ^ src_lane_xor);
  else if (lane >= up) src = t - up;
  T r;
  std::memcpy(&r, &b.exchange[src], sizeof(T));
  emu::yield(emu::kAtWarpBarrier);  // every lane has read before the slots are reused
  return r;
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return emu_shuffle(v, lane_mask, -1);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  return emu_shuffle(v, 0, static_cast<int>(delta));
}

// Fibers never run at the same time: plain read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}
inline int atomicMax(int* p, int v) {
  const int old = *p;
  if (v > old) *p = v;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
// IEEE-rounded division and square root: what the kernels ask for under --use_fast_math.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
