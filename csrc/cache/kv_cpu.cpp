// Key-value cache ops on the CPU (contract in cache_kernels.h). Every op is a set of byte
// moves: for each (row, head) pair the slots involved are contiguous in the cache, so an
// append is one memcpy per pair when the source's slots are contiguous too (else one per
// slot), an insert one memmove plus one memcpy per pair, a gather one memcpy per pair.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cache/cache_kernels.h"

namespace mmfm {
namespace cache {
namespace {

// Below this many bytes a parallel region costs more than it saves: one thread copies about
// 1 MiB in 50-100 us, a fork/join costs a few us on an idle machine but a scheduler time slice
// (milliseconds) when the cores are busy, since every worker must wake up. A decode step's
// append, a typical insert and short prefills stay on the calling thread.
constexpr int64_t kParallelBytes = int64_t(1) << 20;

int threads_for(int64_t bytes, int64_t items) {
  if (bytes < kParallelBytes) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, omp_get_max_threads())));
}

char* slot_ptr(void* cache, const CacheDims& c, int64_t b, int64_t h, int64_t slot) {
  return static_cast<char*>(cache) + ((b * c.H + h) * c.T + slot) * c.row_bytes;
}
const char* src_ptr(const Source& s, int64_t b, int64_t h, int64_t i) {
  return static_cast<const char*>(s.data) + b * s.sb + h * s.sh + i * s.sl;
}

// Copies n slots of src (b, h, 0..n) to dst, as one memcpy when they are contiguous.
void copy_slots(char* dst, const Source& s, int64_t b, int64_t h, int64_t n, int64_t row_bytes) {
  if (n <= 0) return;
  const char* p = src_ptr(s, b, h, 0);
  if (s.sl == row_bytes || n == 1) {
    std::memcpy(dst, p, static_cast<size_t>(n * row_bytes));
    return;
  }
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row_bytes, p + i * s.sl, static_cast<size_t>(row_bytes));
}

}  // namespace

int64_t kv_append_cpu(void* cache, const CacheDims& c, const Source& src, const int64_t* starts,
                      const int64_t* counts, int32_t* status) {
  int64_t bad = 0, slots = 0;
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t n = counts ? counts[b] : src.L;
    status[b] = append_row_status(starts[b], n, src.L, c.T);
    bad += status[b] != kOk;
    slots += n;
  }
  if (bad || c.row_bytes == 0) return bad;
  const int64_t pairs = c.B * c.H;
#pragma omp parallel for schedule(static) num_threads(threads_for(slots * c.H * c.row_bytes, pairs))
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = p / c.H, h = p % c.H;
    copy_slots(slot_ptr(cache, c, b, h, starts[b]), src, b, h, counts ? counts[b] : src.L, c.row_bytes);
  }
  return 0;
}

int64_t kv_insert_cpu(void* cache, const CacheDims& c, const Source& entries, const int64_t* lengths,
                      const int64_t* at, int32_t* status) {
  const int64_t N = entries.L;
  int64_t bad = 0, slots = 0;
  for (int64_t b = 0; b < c.B; ++b) {
    status[b] = insert_row_status(lengths[b], at[b], N, c.T);
    bad += status[b] != kOk;
    slots += lengths[b] - at[b] + N;
  }
  if (bad || N == 0 || c.row_bytes == 0) return bad;
  const int64_t pairs = c.B * c.H;
#pragma omp parallel for schedule(static) num_threads(threads_for(slots * c.H * c.row_bytes, pairs))
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = p / c.H, h = p % c.H;
    char* gap = slot_ptr(cache, c, b, h, at[b]);
    const int64_t moved = lengths[b] - at[b];
    // memmove copies as if through a scratch buffer: the destination overlaps the source
    // whenever more than N slots move.
    if (moved > 0) std::memmove(gap + N * c.row_bytes, gap, static_cast<size_t>(moved * c.row_bytes));
    copy_slots(gap, entries, b, h, N, c.row_bytes);
  }
  return 0;
}

int64_t kv_gather_rows_cpu(const void* cache, const CacheDims& c, const int64_t* rows, int64_t R, void* out,
                           int32_t* status) {
  int64_t bad = 0;
  for (int64_t r = 0; r < R; ++r) {
    status[r] = gather_row_status(rows[r], c.B);
    bad += status[r] != kOk;
  }
  if (bad) return bad;
  const int64_t head_bytes = c.T * c.row_bytes, pairs = R * c.H;
  const char* in = static_cast<const char*>(cache);
  char* o = static_cast<char*>(out);
#pragma omp parallel for schedule(static) num_threads(threads_for(pairs * head_bytes, pairs))
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t r = p / c.H, h = p % c.H;
    std::memcpy(o + p * head_bytes, in + (rows[r] * c.H + h) * head_bytes, static_cast<size_t>(head_bytes));
  }
  return 0;
}

}  // namespace cache
}  // namespace mmfm
