// Top-k and target ranks over a score matrix that fits in memory, for the CPU torch path of
// spnn_fast.functional.topk_scores / target_rank (spnn_fast/reference/topk.py holds the
// definitions; the matrix product itself stays with the BLAS):
//
//   topk_rows:  for each row n, the k best columns c (c != padding, c not among the row's
//               excluded ids, score > -inf), by descending score, equal scores by the lower
//               column; slots no column fills hold (-inf, fill).
//   rank_rows:  for each row n, #{c != padding : s[n, c] >= s[n, target[n]]} (the target's
//               pessimistic 1-based rank: its own column is the "+ 1").
//
// A row's scan keeps its best k in a small array, replacing the worst one only by a strictly
// better candidate (a higher score, or an equal score from a lower column, which a scan in
// column order never meets), so the tie rule needs no sort of the row. Excluded ids are marked
// in a per-thread byte map of the row's width and unmarked after the row. Rows are split over
// threads; every output depends only on its row.
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

using Ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }


// The best k of one row: vals/cols sorted by (value desc, column asc) at the end.
template <typename T>
void row_topk(const T* s, int64_t V, int64_t k, const uint8_t* banned, T* out_v, int64_t* out_c,
              int64_t fill) {
  const T neg = -std::numeric_limits<T>::infinity();
  int64_t have = 0, worst = 0;  // slots filled; the slot of the worst kept candidate
  constexpr int64_t kBlock = 16;
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t c1 = std::min(V, c0 + kBlock);
    if (have == k) {  // a block with nothing above the worst kept score is skipped whole
      const T bar = out_v[worst];
      int any = 0;
      for (int64_t c = c0; c < c1; ++c) any |= s[c] > bar;  // vectorizes
      if (!any) continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      const T x = s[c];
      if (!(x > neg) || banned[c]) continue;  // -inf and NaN never enter; nor excluded ones
      if (have < k) {
        out_v[have] = x;
        out_c[have] = c;
        ++have;
        if (have == k) {
          worst = 0;
          for (int64_t j = 1; j < k; ++j)
            if (out_v[j] < out_v[worst] || (out_v[j] == out_v[worst] && out_c[j] > out_c[worst]))
              worst = j;
        }
        continue;
      }
      if (x <= out_v[worst]) continue;  // equal: the kept one has the lower column
      out_v[worst] = x;
      out_c[worst] = c;
      worst = 0;
      for (int64_t j = 1; j < k; ++j)
        if (out_v[j] < out_v[worst] || (out_v[j] == out_v[worst] && out_c[j] > out_c[worst]))
          worst = j;
    }
  }
  // order the kept ones: insertion sort of at most k entries
  for (int64_t i = 1; i < have; ++i) {
    const T v = out_v[i];
    const int64_t c = out_c[i];
    int64_t j = i - 1;
    while (j >= 0 && (out_v[j] < v || (out_v[j] == v && out_c[j] > c))) {
      out_v[j + 1] = out_v[j];
      out_c[j + 1] = out_c[j];
      --j;
    }
    out_v[j + 1] = v;
    out_c[j + 1] = c;
  }
  for (int64_t i = have; i < k; ++i) {
    out_v[i] = neg;
    out_c[i] = fill;
  }
}

template <typename T>
py::tuple topk_rows(py::array_t<T, py::array::c_style> scores, int64_t k, const py::object& offsets,
                    const py::object& ids, int64_t padding, int64_t fill, int64_t num_threads) {
  if (scores.ndim() != 2) fail("scores must be [N, V]");
  const int64_t N = scores.shape(0), V = scores.shape(1);
  if (k < 1) fail("k must be >= 1");
  if (padding >= V) fail("padding_idx must be a column of scores or negative (none)");
  Ids off, exc;
  const int64_t *o = nullptr, *e = nullptr;
  if (!offsets.is_none()) {
    off = offsets.cast<Ids>();
    exc = ids.cast<Ids>();
    if (off.ndim() != 1 || off.shape(0) != N + 1) fail("offsets must be [N + 1]");
    if (exc.ndim() != 1) fail("ids must be 1-D");
    o = off.data();
    e = exc.data();
    const int64_t E = exc.shape(0);
    if (o[0] != 0 || o[N] != E) fail("offsets must run from 0 to len(ids)");
    for (int64_t n = 0; n < N; ++n)
      if (o[n + 1] < o[n]) fail("offsets must be non-decreasing");
    for (int64_t i = 0; i < E; ++i)
      if (e[i] < 0 || e[i] >= V) fail("ids must be columns of scores");
  }
  py::array_t<T> values({N, k});
  py::array_t<int64_t> cols({N, k});
  const T* s = scores.data();
  T* ov = values.mutable_data();
  int64_t* oc = cols.mutable_data();
  {
    py::gil_scoped_release release;
    spnn_fast::parallel_rows(N, num_threads, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> banned(static_cast<std::size_t>(V), 0);
      if (padding >= 0) banned[padding] = 1;
      for (int64_t n = r0; n < r1; ++n) {
        if (o != nullptr)
          for (int64_t i = o[n]; i < o[n + 1]; ++i) banned[e[i]] = 1;
        row_topk(s + n * V, V, k, banned.data(), ov + n * k, oc + n * k, fill);
        if (o != nullptr)
          for (int64_t i = o[n]; i < o[n + 1]; ++i) banned[e[i]] = e[i] == padding;
      }
    });
  }
  return py::make_tuple(values, cols);
}

template <typename T>
py::array_t<int64_t> rank_rows(py::array_t<T, py::array::c_style> scores, const Ids& target,
                               int64_t padding, int64_t num_threads) {
  if (scores.ndim() != 2) fail("scores must be [N, V]");
  const int64_t N = scores.shape(0), V = scores.shape(1);
  if (target.ndim() != 1 || target.shape(0) != N) fail("target must be [N]");
  const int64_t* t = target.data();
  for (int64_t n = 0; n < N; ++n)
    if (t[n] < 0 || t[n] >= V) fail("target must be columns of scores");
  py::array_t<int64_t> ranks(N);
  const T* s = scores.data();
  int64_t* out = ranks.mutable_data();
  {
    py::gil_scoped_release release;
    spnn_fast::parallel_rows(N, num_threads, [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n) {
        const T* row = s + n * V;
        const T st = row[t[n]];
        int64_t count = 0;
        for (int64_t c = 0; c < V; ++c) count += row[c] >= st;
        if (padding >= 0) count -= row[padding] >= st;
        out[n] = count;
      }
    });
  }
  return ranks;
}

}  // namespace

void register_topk(py::module_& m) {
  m.def("topk_rows", &topk_rows<float>, py::arg("scores").noconvert(), py::arg("k"),
        py::arg("offsets"), py::arg("ids"), py::arg("padding"), py::arg("fill"),
        py::arg("num_threads"),
        "(values [N, k], columns [N, k]): each row's k best columns of scores [N, V], ties by "
        "the lower column, without the padding column and the row's excluded ids (CSR).");
  m.def("topk_rows", &topk_rows<double>, py::arg("scores").noconvert(), py::arg("k"),
        py::arg("offsets"), py::arg("ids"), py::arg("padding"), py::arg("fill"),
        py::arg("num_threads"));
  m.def("rank_rows", &rank_rows<float>, py::arg("scores").noconvert(), py::arg("target"),
        py::arg("padding"), py::arg("num_threads"),
        "[N] int64: #{columns but padding with a score >= the target's}, per row.");
  m.def("rank_rows", &rank_rows<double>, py::arg("scores").noconvert(), py::arg("target"),
        py::arg("padding"), py::arg("num_threads"));
}
