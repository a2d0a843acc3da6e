// Work splitting shared by the CPU loops: [B, M] becomes (sample, chunk) items so batch 1 still
// uses every core, spread over the calling thread and up to num_threads - 1 helpers.
//
// Why not `#pragma omp parallel for`: the kernels run between torch's own parallel ops, with
// num_threads = torch.get_num_threads(), on machines that are often shared. An OpenMP region ends
// in a barrier that waits for every thread of the team, so one thread descheduled by another
// busy process stalls the whole pass for a scheduler time slice (a 64x3x64x64 pass: 6 ms alone,
// 20-70 ms next to one busy process), and idle libgomp workers spin-wait after the region,
// taking the cores torch's next op needs. Here the caller claims chunks itself from an atomic
// counter and helpers join only if they wake up in time; the caller waits only for helpers that
// actually took a chunk, and idle helpers sleep on a condition variable (no spinning).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

namespace edmfast {

// Below this many elements waking a helper (a futex call, ~10 us to run) costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

// Calls fn(item) once for every item in [0, items), on the calling thread and on up to
// threads - 1 pool threads (1: the caller alone; <= 0: one per hardware thread). Items may run in
// any order and on any thread; results must not depend on either. Safe to call from several
// threads at once (a caller that finds the pool busy runs its items alone) and after fork().
void parallel_for(int64_t items, int threads, const std::function<void(int64_t)>& fn);

// Calls fn(item, b, begin, n) for every chunk [begin, begin + n) of every sample b, items numbered
// b * chunks + j; in parallel when the call is large enough, on at most num_threads threads.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t numel, int64_t chunk, int num_threads, Fn&& fn) {
  const int64_t chunks = (numel + chunk - 1) / chunk;
  const int64_t items = batch * chunks;
  const int threads = batch * numel >= kParallelMin ? num_threads : 1;
  parallel_for(items, threads, [&](int64_t item) {
    const int64_t b = item / chunks;
    const int64_t begin = (item - b * chunks) * chunk;
    fn(item, b, begin, std::min(chunk, numel - begin));
  });
}

}  // namespace edmfast
