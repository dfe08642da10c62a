// The semantic attention's time bias on the CPU, for the PyTorch path
// (spnn_fast/reference/attention.py, which holds the definition and is the fallback):
//
//   bucket(b, i, j) = min(NB - 1, bit_length(|t[b, i] - t[b, j]|))       (gaps as uint64)
//   time_bias_mask:  out[b, h, i, j] (+)= table[h, bucket(b, r0 + i, j)] where key j is
//                    admissible for query r0 + i (key_mask[b, j], and j <= r0 + i if causal),
//                    -inf elsewhere; i < R, j < K.
//   time_bias_grad:  hist[h, n] = sum over b, i < R, j < K with bucket(b, r0 + i, j) == n of
//                    ds[b, h, i, j].
//
// The fused kernel takes the bias as an additive mask: building it in torch costs a dozen passes
// over [B, L, L] int64 gaps and a gather; here each bucket is computed once per (b, i, j) and
// reused by every head, in one pass over the output. The gradient's histogram replaces an int64
// index array and bincount's serial scatter.
//
// Threads take disjoint ranges of b. The histogram sums each (b, h) in a fixed order (i, then j)
// into its own float64 partial and the partials over b in order, so the result does not depend on
// the thread count. Every index read is checked against the arrays' shapes before any thread
// starts.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace {

using Times = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Mask = py::array_t<bool, py::array::c_style | py::array::forcecast>;
using Table = py::array_t<float, py::array::c_style | py::array::forcecast>;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline int64_t bucket_of(int64_t a, int64_t b, int64_t top) {
  const uint64_t g = a >= b ? static_cast<uint64_t>(a) - static_cast<uint64_t>(b)
                            : static_cast<uint64_t>(b) - static_cast<uint64_t>(a);
  const int64_t bits = 63 - __builtin_clzll(g | 1) + (g != 0);
  return bits < top ? bits : top;
}


struct Geometry {
  int64_t B, L, R, K, r0;
};

Geometry check_geometry(const Times& ts, int64_t r0, int64_t R, int64_t K) {
  if (ts.ndim() != 2) fail("timestamps must be [B, L]");
  const int64_t B = ts.shape(0), L = ts.shape(1);
  if (r0 < 0 || R < 0 || r0 + R > L) fail("rows [r0, r0 + R) must lie in [0, L)");
  if (K < 0 || K > L) fail("K must lie in [0, L]");
  return {B, L, R, K, r0};
}

void time_bias_mask(const Times& ts, const py::object& key_mask, const Table& table, bool causal,
                    int64_t r0, py::array_t<float, py::array::c_style> out, bool accumulate,
                    int64_t num_threads) {
  if (out.ndim() != 4) fail("out must be [B, H, R, K]");
  const Geometry g = check_geometry(ts, r0, out.shape(2), out.shape(3));
  if (table.ndim() != 2 || table.shape(0) != out.shape(1) || table.shape(1) < 1)
    fail("time_bias must be [H, NB >= 1] with H = out.shape[1]");
  if (out.shape(0) != g.B) fail("out must have the batch of timestamps");
  if (!out.writeable()) fail("out must be writeable");
  const int64_t H = table.shape(0), NB = table.shape(1);
  Mask km;
  const bool* kmp = nullptr;
  if (!key_mask.is_none()) {
    km = key_mask.cast<Mask>();
    if (km.ndim() != 2 || km.shape(0) != g.B || km.shape(1) != g.L)
      fail("key_mask must be [B, L] like timestamps");
    kmp = km.data();
  }
  const int64_t* t = ts.data();
  const float* tab = table.data();
  float* o = out.mutable_data();
  const float neg = -std::numeric_limits<float>::infinity();
  py::gil_scoped_release release;
  spnn_fast::parallel_rows(g.B, num_threads, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> bucket(g.K);
    std::vector<uint8_t> ok(g.K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* tb = t + b * g.L;
      for (int64_t i = 0; i < g.R; ++i) {
        const int64_t q = g.r0 + i;
        for (int64_t j = 0; j < g.K; ++j) {
          bucket[j] = bucket_of(tb[q], tb[j], NB - 1);
          ok[j] = (kmp == nullptr || kmp[b * g.L + j]) && (!causal || j <= q);
        }
        for (int64_t h = 0; h < H; ++h) {
          float* row = o + ((b * H + h) * g.R + i) * g.K;
          const float* th = tab + h * NB;
          if (accumulate) {
            for (int64_t j = 0; j < g.K; ++j) row[j] = ok[j] ? row[j] + th[bucket[j]] : neg;
          } else {
            for (int64_t j = 0; j < g.K; ++j) row[j] = ok[j] ? th[bucket[j]] : neg;
          }
        }
      }
    }
  });
}

template <typename T>
py::array_t<double> time_bias_grad(const Times& ts, py::array_t<T, py::array::c_style> ds,
                                   int64_t r0, int64_t num_buckets, int64_t num_threads) {
  if (ds.ndim() != 4) fail("ds must be [B, H, R, K]");
  const Geometry g = check_geometry(ts, r0, ds.shape(2), ds.shape(3));
  if (ds.shape(0) != g.B) fail("ds must have the batch of timestamps");
  if (num_buckets < 1) fail("num_buckets must be >= 1");
  const int64_t H = ds.shape(1), NB = num_buckets;
  std::vector<double> part(static_cast<std::size_t>(g.B * H * NB), 0.0);
  const int64_t* t = ts.data();
  const T* d = ds.data();
  {
    py::gil_scoped_release release;
    spnn_fast::parallel_rows(g.B, num_threads, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> bucket(g.K);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* tb = t + b * g.L;
        for (int64_t i = 0; i < g.R; ++i) {
          const int64_t q = g.r0 + i;
          for (int64_t j = 0; j < g.K; ++j) bucket[j] = bucket_of(tb[q], tb[j], NB - 1);
          for (int64_t h = 0; h < H; ++h) {
            const T* row = d + ((b * H + h) * g.R + i) * g.K;
            double* hist = part.data() + (b * H + h) * NB;
            for (int64_t j = 0; j < g.K; ++j) hist[bucket[j]] += static_cast<double>(row[j]);
          }
        }
      }
    });
  }
  py::array_t<double> out({H, NB});
  double* o = out.mutable_data();
  std::fill(o, o + H * NB, 0.0);
  for (int64_t b = 0; b < g.B; ++b)  // a fixed order over b: the same sums for any thread count
    for (int64_t k = 0; k < H * NB; ++k) o[k] += part[b * H * NB + k];
  return out;
}

}  // namespace

void register_time_bias(py::module_& m) {
  m.def("time_bias_mask", &time_bias_mask, py::arg("timestamps"), py::arg("key_mask"),
        py::arg("time_bias"), py::arg("causal"), py::arg("r0"), py::arg("out").noconvert(),
        py::arg("accumulate"), py::arg("num_threads"),
        "Write (or add) the time bias of query rows [r0, r0 + R) into out [B, H, R, K], -inf "
        "where a key is not admissible.");
  m.def("time_bias_grad", &time_bias_grad<float>, py::arg("timestamps"),
        py::arg("ds").noconvert(), py::arg("r0"), py::arg("num_buckets"), py::arg("num_threads"),
        "[H, NB] float64: ds [B, H, R, K] summed by the time bucket of each (query, key) pair.");
  m.def("time_bias_grad", &time_bias_grad<double>, py::arg("timestamps"),
        py::arg("ds").noconvert(), py::arg("r0"), py::arg("num_buckets"), py::arg("num_threads"));
}
