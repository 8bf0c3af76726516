// Stand-in for the header that a CUDA build of torch generates (and the CPU wheel lacks), so
// that tools/check_bindings_cuda.py can compile the bindings' MMFM_WITH_CUDA blocks
// syntax-only against the CPU wheel. Same content as torch's generated file.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
