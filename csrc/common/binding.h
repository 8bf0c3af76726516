// What every binding file needs besides the argument checks (common/checks.h): the check of a
// CUDA kernel's return code, the stream and device guard the kernels run under, and the
// registration of a file's ops for the CPU key and, when built with CUDA, the CUDA key.
//
// MMFM_WITH_CUDA (setup.py defines it when it compiles the .cu files) is read only by the
// binding side; the kernels' headers declare their CUDA entry points unconditionally.
#pragma once
#include <torch/library.h>

#ifdef MMFM_WITH_CUDA
// c10's stream and guard headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS,
// cuSPARSE and cuSOLVER headers the bindings do not need).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace mmfm {

#ifdef MMFM_WITH_CUDA
// The CUDA kernels return a cudaError_t as int (0 = success).
inline void cuda_ok(int code, const char* op) {
  TORCH_CHECK(code == 0, "mmfm.", op, ": CUDA kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}

// The current stream of the current device, as the kernels' `void* stream`.
inline void* cuda_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

#define MMFM_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard guard_(t.device())
#else
#define MMFM_DEVICE_GUARD(t) (void)0
#endif

}  // namespace mmfm

// Registers `fn` (a function of torch::Library&) for the CPU key and, when built with CUDA, for
// the CUDA key: the binding functions dispatch on the tensors' device themselves.
#ifdef MMFM_WITH_CUDA
#define MMFM_REGISTER_CPU_AND_CUDA(fn)        \
  TORCH_LIBRARY_IMPL(mmfm, CPU, m) { fn(m); } \
  TORCH_LIBRARY_IMPL(mmfm, CUDA, m) { fn(m); }
#else
#define MMFM_REGISTER_CPU_AND_CUDA(fn) \
  TORCH_LIBRARY_IMPL(mmfm, CPU, m) { fn(m); }
#endif
