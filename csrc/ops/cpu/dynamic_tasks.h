#pragma once
// Tasks handed out one at a time to the threads of a parallel region, instead of a fixed share
// per thread: on cores shared with other jobs, a thread that gets less CPU time does fewer
// tasks instead of holding up the whole call. A task's result must not depend on the thread
// that runs it (kernels write per-task partials and merge them in task order).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fusedset {

// Runs worker(next) once on each of up to max_threads threads (at least one); next() returns
// the tasks 0, 1, ..., count - 1, each to one caller, then -1. A worker sets up its scratch
// memory once and loops over next().
template <typename Worker>
void run_dynamic(int64_t count, int64_t max_threads, const Worker& worker) {
  std::atomic<int64_t> next_task{0};
  const auto next = [&next_task, count]() -> int64_t {
    const int64_t task = next_task.fetch_add(1, std::memory_order_relaxed);
    return task < count ? task : -1;
  };
  const int64_t threads = std::clamp<int64_t>(
      std::min<int64_t>(max_threads, at::get_num_threads()), 1, std::max<int64_t>(count, 1));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(next); });
}

}  // namespace fusedset
