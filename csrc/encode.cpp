// Batch encoder: CSR interaction log -> padded [B, L] item / time / bucket / mask / target arrays
// (+ [B, L, K] sampled negatives). The definition, the negative-sampling formula and the checks are
// documented in spnn_fast/reference/encode.py, which this file matches bit for bit.
//
// Threading: the output arrays are allocated with the GIL held, then the GIL is released and
// std::thread workers fill disjoint row ranges. Every output value depends only on its slot, never
// on which thread wrote it, so results are identical for any thread count.
//
// Safety: this function can be called directly with arbitrary arrays. Every row checks the offsets
// and the end it reads before touching the log, and every item / timestamp it reads is checked;
// errors raise ValueError (std::invalid_argument) naming the smallest offending index.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "buffer_pool.h"

namespace py = pybind11;

namespace {

using InArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

#if defined(__GNUC__)
#define SPNN_FAST_INLINE inline __attribute__((always_inline))
#else
#define SPNN_FAST_INLINE inline
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
// The row loop is compiled for AVX-512 and AVX2 as well as the x86-64 baseline, picked at load
// time: the baseline (SSE2) has no 64-bit compares, multiplies or int64 <-> double conversions,
// so the checks, buckets and sampling would not vectorize. Every version computes the same
// integer and IEEE double operations, so results are identical on any CPU.
#define SPNN_FAST_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPNN_FAST_CLONES
#endif

SPNN_FAST_INLINE uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// bit_length(g) for g >= 0 (as unsigned), without a branch: bit_length(0) = 0.
SPNN_FAST_INLINE int64_t bit_length(uint64_t g) {
  return 63 - __builtin_clzll(g | 1) + (g != 0);
}

struct Problem {
  const int64_t* offsets;
  const int64_t* items;
  const int64_t* times;
  const int64_t* rows;
  const int64_t* ends;
  const int64_t* target_ends;  // a position's target is the next event if its index is below
  int64_t num_users, num_events, batch, max_len, num_items, num_buckets, num_negatives;
  int64_t ignore_index;  // the target of a position without one (padding included)
  uint64_t seed_mix;
  bool pad_left;
  int64_t* out_items;
  int64_t* out_times;
  int64_t* out_buckets;
  bool* out_mask;
  int64_t* out_targets;
  int64_t* out_negatives;  // null when num_negatives == 0
};

// The smallest offending index of each kind seen by one worker (kNone: none).
struct Errors {
  int64_t row = kNone;   // a row whose user, offsets or end is invalid
  int64_t item = kNone;  // global index of an item outside [1, num_items]
  int64_t time = kNone;  // global index i with times[i] < times[i - 1] inside a user
  void merge(const Errors& o) {
    row = std::min(row, o.row);
    item = std::min(item, o.item);
    time = std::min(time, o.time);
  }
};


// Negatives of n consecutive columns, K slots each, whose counters run base, base + 1, ...:
// for a target T in [1, V], idx = min(V - 2, int64(double(h >> 11) * 2^-53 * double(V - 1))) with
// h = splitmix64(counter), item = idx + 1 + (idx + 1 >= T); without a target the slots are 0.
// Two passes: the draws over all n * K slots in one flat loop (full vectors whatever K is), then
// the target exclusion per column.
SPNN_FAST_INLINE void sample_negatives(int64_t* out, const int64_t* targets, int64_t n,
                                       int64_t K, uint64_t base, int64_t V) {
  const double scale = static_cast<double>(V - 1);
  const int64_t top = V - 2;
  const int64_t count = n * K;
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t h = splitmix64(base + static_cast<uint64_t>(i));
    // h >> 11 < 2^53: exact as a double, and int64 -> double converts in one instruction.
    const double x = static_cast<double>(static_cast<int64_t>(h >> 11)) * 0x1.0p-53 * scale;
    const int64_t idx = static_cast<int64_t>(x);
    out[i] = (idx < top ? idx : top) + 1;
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t target = targets[j];
    // no target (ignore_index, never in [1, V]) zeroes the slots
    const int64_t keep = static_cast<uint64_t>(target) - 1 < static_cast<uint64_t>(V) ? -1 : 0;
    int64_t* slot = out + j * K;
    for (int64_t k = 0; k < K; ++k) slot[k] = (slot[k] + (slot[k] >= target)) & keep;
  }
}

// Window geometry of one row, or false when the row's user, offsets or end are invalid.
struct Window {
  int64_t start, length, s, n;
};

SPNN_FAST_INLINE bool row_window(const Problem& P, int64_t b, Window* w) {
  const int64_t u = P.rows[b], e = P.ends[b];
  if (u < 0 || u >= P.num_users) return false;
  const int64_t lo = P.offsets[u], hi = P.offsets[u + 1];
  if (lo < 0 || lo > hi || hi > P.num_events) return false;
  if (e < 1 || e > hi - lo) return false;
  w->start = lo;
  w->length = hi - lo;
  w->s = std::max<int64_t>(0, e - P.max_len);
  w->n = e - w->s;
  return true;
}

void zero_row(const Problem& P, int64_t b) {
  const int64_t L = P.max_len, K = P.num_negatives;
  std::memset(P.out_items + b * L, 0, L * sizeof(int64_t));
  std::memset(P.out_times + b * L, 0, L * sizeof(int64_t));
  std::memset(P.out_buckets + b * L, 0, L * sizeof(int64_t));
  std::fill_n(P.out_targets + b * L, L, P.ignore_index);
  std::memset(P.out_mask + b * L, 0, L);
  if (K > 0) std::memset(P.out_negatives + b * L * K, 0, L * K * sizeof(int64_t));
}

// Zeroes columns [0, c0) and [c1, L) of an int64 row.
SPNN_FAST_INLINE void zero_pad(int64_t* row, int64_t c0, int64_t c1, int64_t L) {
  if (c0 > 0) std::memset(row, 0, c0 * sizeof(int64_t));
  if (c1 < L) std::memset(row + c1, 0, (L - c1) * sizeof(int64_t));
}

// Sets columns [0, c0) and [c1, L) of an int64 row to v.
SPNN_FAST_INLINE void fill_pad(int64_t* row, int64_t c0, int64_t c1, int64_t L, int64_t v) {
  std::fill_n(row, c0, v);
  std::fill_n(row + c1, L - c1, v);
}

// Rows are random users: fetch the offsets two rows ahead and the window runs one row ahead.
SPNN_FAST_INLINE void prefetch_offsets(const Problem& P, int64_t b) {
  const int64_t u = P.rows[b];
  if (u >= 0 && u < P.num_users) __builtin_prefetch(P.offsets + u);
}

SPNN_FAST_INLINE void prefetch_window(const Problem& P, int64_t b) {
  const int64_t u = P.rows[b], e = P.ends[b];
  if (u < 0 || u >= P.num_users) return;
  const int64_t lo = P.offsets[u], s = lo + std::max<int64_t>(0, e - P.max_len);
  if (s < 0 || s >= P.num_events) return;
  // The first lines of each run; the hardware prefetcher follows the rest of the run.
  for (int k = 0; k < 4; ++k) {
    __builtin_prefetch(P.items + std::min(s + 8 * k, P.num_events - 1));
    __builtin_prefetch(P.times + std::min(s + 8 * k, P.num_events - 1));
  }
}

SPNN_FAST_INLINE void encode_row(const Problem& P, int64_t b, const Window& w, Errors* err) {
  const int64_t L = P.max_len, K = P.num_negatives, V = P.num_items;
  const int64_t s = w.s, n = w.n, e = s + n;
  const int64_t c0 = P.pad_left ? L - n : 0, c1 = c0 + n;
  const int64_t* it = P.items + w.start;
  const int64_t* tt = P.times + w.start;
  int64_t* oi = P.out_items + b * L;
  int64_t* ot = P.out_times + b * L;
  int64_t* ob = P.out_buckets + b * L;
  int64_t* og = P.out_targets + b * L;
  bool* om = P.out_mask + b * L;

  zero_pad(oi, c0, c1, L);
  zero_pad(ot, c0, c1, L);
  zero_pad(ob, c0, c1, L);
  fill_pad(og, c0, c1, L, P.ignore_index);
  if (c0 > 0) std::memset(om, 0, c0);
  if (c1 < L) std::memset(om + c1, 0, L - c1);
  std::memset(om + c0, 1, n);
  std::memcpy(oi + c0, it + s, n * sizeof(int64_t));
  std::memcpy(ot + c0, tt + s, n * sizeof(int64_t));

  // Targets: the event at p + 1 for the positions p < target_end - 1 (never past the user's
  // last event), then ignore_index. Items read: the window [s, e) and those targets.
  const int64_t te = std::min(P.target_ends[b], w.length);
  const int64_t nt = std::max<int64_t>(0, std::min(e, te - 1) - s);
  std::memcpy(og + c0, it + s + 1, nt * sizeof(int64_t));
  std::fill_n(og + c0 + nt, n - nt, P.ignore_index);
  const int64_t read_end = std::max(e, s + 1 + nt);

  // Items read: [s, read_end). One vectorizable pass; the slow scan only runs on a bad row.
  const uint64_t uv = static_cast<uint64_t>(V);
  uint64_t bad_item = 0;
  for (int64_t p = s; p < read_end; ++p) bad_item |= static_cast<uint64_t>(it[p]) - 1 >= uv;
  if (bad_item) {
    for (int64_t p = s; p < read_end; ++p) {
      if (static_cast<uint64_t>(it[p]) - 1 >= uv) {
        err->item = std::min(err->item, w.start + p);
        break;
      }
    }
  }

  // Buckets: gaps to the previous event of the user (unsigned: exact for every ordered pair).
  const int64_t top = P.num_buckets - 1;
  const int64_t p0 = std::max<int64_t>(s, 1);
  if (s == 0) ob[c0] = 0;
  uint64_t bad_time = 0;
  for (int64_t p = p0; p < e; ++p) {
    bad_time |= tt[p] < tt[p - 1];
    const uint64_t g = static_cast<uint64_t>(tt[p]) - static_cast<uint64_t>(tt[p - 1]);
    ob[c0 + p - s] = std::min(top, bit_length(g));
  }
  if (bad_time) {
    for (int64_t p = p0; p < e; ++p) {
      if (tt[p] < tt[p - 1]) {
        err->time = std::min(err->time, w.start + p);
        break;
      }
    }
  }

  if (K > 0) {
    int64_t* on = P.out_negatives + b * L * K;
    if (c0 > 0) std::memset(on, 0, c0 * K * sizeof(int64_t));
    if (c1 < L) std::memset(on + c1 * K, 0, (L - c1) * K * sizeof(int64_t));
    sample_negatives(on + c0 * K, og + c0, n, K,
                     P.seed_mix + static_cast<uint64_t>((b * L + c0) * K), V);
  }
}

SPNN_FAST_CLONES void encode_rows(const Problem& P, int64_t b0, int64_t b1, Errors* err) {
  for (int64_t b = b0; b < b1; ++b) {
    if (b + 2 < b1) prefetch_offsets(P, b + 2);
    if (b + 1 < b1) prefetch_window(P, b + 1);
    Window w;
    if (!row_window(P, b, &w)) {
      err->row = std::min(err->row, b);
      zero_row(P, b);
      continue;
    }
    encode_row(P, b, w, err);
  }
}

// Runs encode_rows over [0, batch) split into num_threads contiguous ranges; the caller's thread
// takes the first range. Returns the merged errors.
Errors run_parallel(const Problem& P, int64_t num_threads) {
  const int64_t T = std::max<int64_t>(1, std::min(num_threads, P.batch));
  std::vector<Errors> errs(T);
  auto range = [&](int64_t t) { return std::make_pair(P.batch * t / T, P.batch * (t + 1) / T); };
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  int64_t spawned = 1;
  for (; spawned < T; ++spawned) {
    const auto r = range(spawned);
    Errors* e = &errs[spawned];
    try {
      pool.emplace_back([&P, r, e]() { encode_rows(P, r.first, r.second, e); });
    } catch (const std::system_error&) {
      break;  // no more threads available: the caller runs the remaining ranges itself
    }
  }
  for (int64_t t = spawned; t < T; ++t) {
    const auto r = range(t);
    encode_rows(P, r.first, r.second, &errs[t]);
  }
  const auto r0 = range(0);
  encode_rows(P, r0.first, r0.second, &errs[0]);
  for (auto& th : pool) th.join();
  Errors all;
  for (const auto& e : errs) all.merge(e);
  return all;
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string row_error(const Problem& P, int64_t b) {
  const int64_t u = P.rows[b], e = P.ends[b];
  const std::string at = "[" + std::to_string(b) + "]=";
  if (u < 0 || u >= P.num_users)
    return "rows" + at + std::to_string(u) + " is outside [0, " + std::to_string(P.num_users) +
           ")";
  const int64_t lo = P.offsets[u], hi = P.offsets[u + 1];
  if (lo < 0 || lo > hi || hi > P.num_events)
    return "offsets[" + std::to_string(u) + ":" + std::to_string(u + 2) + "]=[" +
           std::to_string(lo) + ", " + std::to_string(hi) + "] (user of rows[" +
           std::to_string(b) + "]) is not a range inside the " + std::to_string(P.num_events) +
           " events";
  return "ends" + at + std::to_string(e) + " is outside [1, " + std::to_string(hi - lo) +
         "] (the length of user " + std::to_string(u) + " at rows[" + std::to_string(b) + "])";
}

py::tuple encode_batch(const InArray& offsets, const InArray& items, const InArray& timestamps,
                       const InArray& rows, const InArray& ends, const InArray& target_ends,
                       int64_t max_len,
                       int64_t num_items, int64_t num_time_buckets, int64_t num_negatives,
                       uint64_t seed, bool pad_left, int64_t num_threads,
                       int64_t ignore_index) {
  const std::pair<const InArray*, const char*> named[] = {
      {&offsets, "offsets"}, {&items, "items"}, {&timestamps, "timestamps"},
      {&rows, "rows"},       {&ends, "ends"}, {&target_ends, "target_ends"}};
  for (const auto& a : named)
    if (a.first->ndim() != 1)
      fail(std::string(a.second) + " must be 1-D, got " + std::to_string(a.first->ndim()) +
           " dimensions");
  if (offsets.shape(0) < 1) fail("offsets must have at least one entry");
  if (timestamps.shape(0) != items.shape(0))
    fail("timestamps has " + std::to_string(timestamps.shape(0)) + " entries, items has " +
         std::to_string(items.shape(0)));
  if (rows.shape(0) != ends.shape(0) || rows.shape(0) != target_ends.shape(0))
    fail("rows, ends and target_ends must have equal lengths, got " +
         std::to_string(rows.shape(0)) + ", " + std::to_string(ends.shape(0)) + " and " +
         std::to_string(target_ends.shape(0)));
  if (max_len < 1) fail("max_len must be >= 1, got " + std::to_string(max_len));
  if (num_time_buckets < 1)
    fail("num_time_buckets must be >= 1, got " + std::to_string(num_time_buckets));
  if (num_negatives < 0) fail("num_negatives must be >= 0, got " + std::to_string(num_negatives));
  if (num_items < (num_negatives > 0 ? 2 : 1))
    fail("num_items must be >= " + std::string(num_negatives > 0 ? "2" : "1") +
         (num_negatives > 0 ? " to sample negatives" : "") + ", got " +
         std::to_string(num_items));
  if (num_threads < 1) fail("num_threads must be >= 1, got " + std::to_string(num_threads));
  if (ignore_index >= 1 && ignore_index <= num_items)
    fail("ignore_index must not be an item id in [1, " + std::to_string(num_items) + "], got " +
         std::to_string(ignore_index));

  const int64_t B = rows.shape(0), L = max_len, K = num_negatives;
  // One pooled block holds every output: four int64 [B, L], the negatives, then the bool mask.
  // Sizes are checked for overflow before anything is allocated or written.
  std::size_t slots = 0, neg_slots = 0, plane = 0, neg_bytes = 0, total = 0;
  const auto round64 = [](std::size_t n, std::size_t* out) {
    return !__builtin_add_overflow(n, std::size_t(63), out) && ((*out = *out / 64 * 64), true);
  };
  const bool too_large =
      __builtin_mul_overflow(static_cast<std::size_t>(B), static_cast<std::size_t>(L), &slots) ||
      __builtin_mul_overflow(slots, static_cast<std::size_t>(K), &neg_slots) ||
      __builtin_mul_overflow(slots, sizeof(int64_t), &plane) || !round64(plane, &plane) ||
      __builtin_mul_overflow(neg_slots, sizeof(int64_t), &neg_bytes) ||
      !round64(neg_bytes, &neg_bytes) || __builtin_mul_overflow(plane, std::size_t(4), &total) ||
      __builtin_add_overflow(total, neg_bytes, &total) ||
      __builtin_add_overflow(total, slots, &total) ||
      total > static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());
  if (too_large)
    fail("the outputs for B=" + std::to_string(B) + ", max_len=" + std::to_string(L) +
         ", num_negatives=" + std::to_string(K) + " do not fit in memory");
  void* block = nullptr;
  py::capsule owner = spnn_fast::BufferPool::instance().acquire(total, &block);
  char* base = static_cast<char*>(block);
  auto plane_at = [&](std::size_t i) {
    return py::array_t<int64_t>({B, L}, reinterpret_cast<int64_t*>(base + i * plane), owner);
  };
  py::array_t<int64_t> out_items = plane_at(0), out_times = plane_at(1),
                       out_buckets = plane_at(2), out_targets = plane_at(3);
  py::array_t<bool> out_mask({B, L}, reinterpret_cast<bool*>(base + 4 * plane + neg_bytes),
                             owner);
  py::object negatives = py::none();
  int64_t* neg_ptr = nullptr;
  if (K > 0) {
    neg_ptr = reinterpret_cast<int64_t*>(base + 4 * plane);
    negatives = py::array_t<int64_t>({B, L, K}, neg_ptr, owner);
  }

  Problem P{offsets.data(), items.data(), timestamps.data(), rows.data(), ends.data(),
            target_ends.data(), offsets.shape(0) - 1, items.shape(0), B, L, num_items, num_time_buckets, K,
            ignore_index, splitmix64(seed), pad_left, out_items.mutable_data(), out_times.mutable_data(),
            out_buckets.mutable_data(), out_mask.mutable_data(), out_targets.mutable_data(),
            neg_ptr};
  Errors err;
  {
    py::gil_scoped_release release;
    err = run_parallel(P, num_threads);
  }
  if (err.row != kNone) fail(row_error(P, err.row));
  if (err.item != kNone)
    fail("items[" + std::to_string(err.item) + "]=" + std::to_string(P.items[err.item]) +
         " is outside [1, " + std::to_string(num_items) + "]");
  if (err.time != kNone)
    fail("timestamps decrease within a user at index " + std::to_string(err.time) + ": " +
         std::to_string(P.times[err.time]) + " < " + std::to_string(P.times[err.time - 1]));
  return py::make_tuple(out_items, out_times, out_buckets, out_mask, out_targets, negatives);
}

}  // namespace

void register_encode(py::module_& m) {
  m.def(
      "release_cached_buffers", []() { return spnn_fast::BufferPool::instance().release_idle(); },
      "Free the idle output blocks kept for reuse; returns the bytes freed.");
  m.def(
      "cached_buffers",
      []() { return spnn_fast::BufferPool::instance().idle_stats(); },
      "(count, bytes) of idle output blocks kept for reuse.");
  m.def("encode_batch", &encode_batch, py::arg("offsets"), py::arg("items"),
        py::arg("timestamps"), py::arg("rows"), py::arg("ends"), py::arg("target_ends"),
        py::arg("max_len"),
        py::arg("num_items"), py::arg("num_time_buckets"), py::arg("num_negatives"),
        py::arg("seed"), py::arg("pad_left"), py::arg("num_threads"), py::arg("ignore_index") = -100,
        "Encode a batch of windows from a CSR log; returns numpy (items, timestamps, "
        "time_buckets, mask, targets, negatives or None). Checks only what it reads. "
        "spnn_fast.encode.encode_batch is the public entry point.");
}
