// Stand-in for the one CUB call the quantization kernels make (ema_cuda.cu's stable
// SortPairs), for the CPU emulation in ../cuda_runtime.h. Same contract as CUB: a first call
// with d_temp_storage == nullptr only sizes the temporary storage; the second sorts the pairs
// stably by bits [begin_bit, end_bit) of the keys, and bits outside that range do not order
// anything. CUB itself is not under test here: the code around it (the launcher's storage
// sizing, the kernels that build its input and read its output) is.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub {

struct DeviceRadixSort {
  template <class K, class V>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, int64_t num_items, int begin_bit, int end_bit,
                               cudaStream_t = nullptr) {
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = 1024;  // some non-zero size, so the caller's carving is exercised
      return cudaSuccess;
    }
    if (temp_storage_bytes < 1024 || begin_bit < 0 || end_bit > 64 || begin_bit >= end_bit) return cudaErrorInvalidValue;
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t(0) : (uint64_t(1) << width) - 1;
    auto digit = [&](int64_t i) { return (static_cast<uint64_t>(keys_in[i]) >> begin_bit) & mask; };
    std::vector<int64_t> order(static_cast<size_t>(num_items));
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return digit(a) < digit(b); });
    std::vector<K> k(order.size());
    std::vector<V> v(order.size());
    for (size_t i = 0; i < order.size(); ++i) {
      k[i] = keys_in[order[i]];
      v[i] = values_in[order[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};

}  // namespace cub
