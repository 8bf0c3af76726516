// CPU-only pieces shared by sample_cpu.cpp and verify_cpu.cpp: the OpenMP row split, the
// scratch growth and the tile step of the inverse-CDF draw (both draw the same way: per-tile
// sums, then a scan inside the one tile where the running sum passes the target).
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace mmfm {
namespace sampling {

constexpr int64_t kTile = 256;  // elements per tile of a draw (the scan reads one tile)

// No more threads than rows: an idle thread would still have to reach the region's barrier,
// which costs a scheduler time slice when the machine is busy.
inline int row_threads(int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, omp_get_max_threads())));
}

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// The tile where the running sum of the tile sums first exceeds `target`; `cum` gets the sum
// of the tiles before it. If rounding leaves the target beyond the last tile, returns the last
// tile of positive sum and sets `target` to +inf, so that the scan inside the tile takes its
// last token of positive weight.
inline int64_t find_tile(const double* tsum, int64_t ntiles, double& target, double& cum) {
  int64_t t = 0;
  for (; t < ntiles; ++t) {
    if (cum + tsum[t] > target) break;
    cum += tsum[t];
  }
  if (t == ntiles) {
    target = std::numeric_limits<double>::infinity();
    for (t = ntiles - 1; t > 0 && !(tsum[t] > 0.0); --t) {
    }
  }
  return t;
}

}  // namespace sampling
}  // namespace mmfm
