// Row-range parallelism for the CPU helpers of the attention's time bias and the top-k:
// parallel_rows(rows, threads, fn) runs fn(r0, r1) over [0, rows) split into at most `threads`
// contiguous ranges, the caller's thread taking the first. An exception in any range (a failed
// allocation, say) is caught, every thread is joined, and the first one is rethrown in the
// caller: pybind11 turns it into a Python exception instead of the process terminating.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace spnn_fast {

template <typename Fn>
void parallel_rows(int64_t rows, int64_t threads, Fn fn) {
  const int64_t T = std::max<int64_t>(1, std::min(threads, rows));
  auto range = [&](int64_t t) { return std::make_pair(rows * t / T, rows * (t + 1) / T); };
  std::exception_ptr error;
  std::mutex lock;
  auto guarded = [&](int64_t r0, int64_t r1) {
    try {
      fn(r0, r1);
    } catch (...) {
      std::lock_guard<std::mutex> hold(lock);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  int64_t spawned = 1;
  for (; spawned < T; ++spawned) {
    const auto r = range(spawned);
    try {
      pool.emplace_back([&guarded, r]() { guarded(r.first, r.second); });
    } catch (const std::system_error&) {
      break;  // no more threads: the caller runs the remaining ranges
    }
  }
  for (int64_t t = spawned; t < T; ++t) guarded(range(t).first, range(t).second);
  guarded(range(0).first, range(0).second);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace spnn_fast
