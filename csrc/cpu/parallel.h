// Work splitting shared by the CPU loops: [B, M] becomes (sample, chunk) items so batch 1 still
// uses every core, run in parallel with OpenMP once the work pays for the fork/join.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace edmfast {

// Below this many elements the OpenMP fork/join (~several us) costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

// Calls fn(item, b, begin, n) for every chunk [begin, begin + n) of every sample b, items numbered
// b * chunks + j; num_threads <= 0 means OpenMP's default.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t numel, int64_t chunk, int num_threads, Fn&& fn) {
  const int64_t chunks = (numel + chunk - 1) / chunk;
  const int64_t items = batch * chunks;
  const bool parallel = batch * numel >= kParallelMin;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
#else
  (void)num_threads;
  (void)parallel;
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / chunks;
    const int64_t begin = (item - b * chunks) * chunk;
    fn(item, b, begin, std::min(chunk, numel - begin));
  }
}

}  // namespace edmfast
