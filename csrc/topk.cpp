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
// Three scans, chosen by the row's width and k (see kExtractMax), each keeping the tie rule
// without sorting the row. Narrow rows are copied with the excluded ids set to -inf; wide rows'
// excluded ids are marked in a per-thread byte map of the row's width and unmarked after it.
// Rows are split over threads; every output depends only on its row.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace {

using Ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }


// The streaming scans below write each row's best k sorted by (value desc, column asc) into
// out_v/out_c and pad with (-inf, fill).

// row_scan: the best k kept in a small array, the worst one replaced only by a strictly better
// candidate (a higher score, or an equal score from a lower column, which a scan in column order
// never meets): O(k) per replacement, the fastest for small k over wide rows.
template <typename T>
void row_scan(const T* s, int64_t V, int64_t k, const uint8_t* banned, T* out_v, int64_t* out_c,
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


// row_gather: candidates above a rising bar gathered and, whenever they pass `cap`, cut to the
// best k (the bar becoming the k-th one's score; a later column scoring at most the bar loses to
// the kept ones): O(1) per candidate, for large k over wide rows.
template <typename T>
void row_gather(const T* s, int64_t V, int64_t k, const uint8_t* banned, T* out_v,
                int64_t* out_c, int64_t fill, std::vector<std::pair<T, int64_t>>& cand) {
  using Cand = std::pair<T, int64_t>;
  const T neg = -std::numeric_limits<T>::infinity();
  const auto better = [](const Cand& a, const Cand& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  constexpr int64_t kBlock = 16;
  const std::size_t cap = static_cast<std::size_t>(std::max<int64_t>(4 * k, 64));
  cand.clear();
  T bar = neg;  // -inf and NaN never enter: neither is > -inf
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t c1 = std::min(V, c0 + kBlock);
    int any = 0;
    for (int64_t c = c0; c < c1; ++c) any |= s[c] > bar;  // vectorizes
    if (!any) continue;
    for (int64_t c = c0; c < c1; ++c)
      if (s[c] > bar && !banned[c]) cand.emplace_back(s[c], c);
    if (cand.size() >= cap) {
      std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
      cand.resize(static_cast<std::size_t>(k));
      bar = cand[0].first;
      for (int64_t j = 1; j < k; ++j) bar = std::min(bar, cand[j].first);
    }
  }
  const int64_t have = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
  std::partial_sort(cand.begin(), cand.begin() + have, cand.end(), better);
  for (int64_t i = 0; i < have; ++i) {
    out_v[i] = cand[i].first;
    out_c[i] = cand[i].second;
  }
  for (int64_t i = have; i < k; ++i) {
    out_v[i] = neg;
    out_c[i] = fill;
  }
}

// The max of 16 values by halving: elementwise steps that vectorize (a running max is a chain the
// compiler must keep in order without fast-math).
template <typename T>
inline T max16(const T* p) {
  T t[8];
  for (int j = 0; j < 8; ++j) t[j] = p[j + 8] > p[j] ? p[j + 8] : p[j];
  for (int j = 0; j < 4; ++j) t[j] = t[j + 4] > t[j] ? t[j + 4] : t[j];
  for (int j = 0; j < 2; ++j) t[j] = t[j + 2] > t[j] ? t[j + 2] : t[j];
  return t[1] > t[0] ? t[1] : t[0];
}

// row_extract, for narrow rows: the row copied into `y` (NaN, the padding and the excluded
// columns as -inf), the maxima of its blocks of 16 and of 16 blocks kept, and the best column
// taken k times from the top down: the first block holding the maximum, its first column holding
// it (so equal scores come out by the lower column), then that column set to -inf and its two
// maxima recomputed. No sort, no data-dependent branch per column.
template <typename T>
void row_extract(const T* s, int64_t V, int64_t k, const int64_t* ban, int64_t nban,
                 int64_t padding, T* out_v, int64_t* out_c, int64_t fill, std::vector<T>& y) {
  const T neg = -std::numeric_limits<T>::infinity();
  constexpr int64_t B = 16;
  const int64_t nb = (V + B - 1) / B, ns = (nb + B - 1) / B;
  const int64_t ny = nb * B, nm = ns * B;
  y.resize(static_cast<std::size_t>(ny + nm + ns));
  T* yy = y.data();
  T* m1 = yy + ny;  // block maxima (padded with -inf to whole groups of 16)
  T* m2 = m1 + nm;  // maxima of 16 blocks
  for (int64_t c = 0; c < V; ++c) yy[c] = s[c] > neg ? s[c] : neg;
  for (int64_t c = V; c < ny; ++c) yy[c] = neg;
  if (padding >= 0) yy[padding] = neg;
  for (int64_t i = 0; i < nban; ++i) yy[ban[i]] = neg;
  for (int64_t b = 0; b < nb; ++b) m1[b] = max16(yy + b * B);
  for (int64_t b = nb; b < nm; ++b) m1[b] = neg;
  for (int64_t g = 0; g < ns; ++g) m2[g] = max16(m1 + g * B);
  int64_t i = 0;
  for (; i < k; ++i) {
    T top = m2[0];
    for (int64_t g = 1; g < ns; ++g) top = m2[g] > top ? m2[g] : top;
    if (!(top > neg)) break;  // nothing admissible left
    int64_t g = 0;
    while (!(m2[g] == top)) ++g;
    int64_t b = g * B;
    while (!(m1[b] == top)) ++b;
    int64_t c = b * B;
    while (!(yy[c] == top)) ++c;
    out_v[i] = s[c];
    out_c[i] = c;
    yy[c] = neg;
    m1[b] = max16(yy + b * B);
    m2[g] = max16(m1 + g * B);
  }
  for (; i < k; ++i) {
    out_v[i] = neg;
    out_c[i] = fill;
  }
}

// Which scan serves a row (a 2-core x86 VM, 943 rows, float32; old = row_scan):
//   columns <= kExtractMax: row_extract (1,000 columns, k = 10: 0.93 ms against 2.9 ms; 4,096:
//     2.9 against 4.8; 16,384: 11.4 against 10.1; 1,000 columns, k = 100: 6.0 against 36.5);
//   wider, k < kGatherFromK: row_scan (10^5 columns, k = 10: 31 ms against 36 for row_gather);
//   wider, larger k: row_gather (10^5 columns, k = 100: 88 ms against 140).
constexpr int64_t kExtractMax = 8192;
constexpr int64_t kGatherFromK = 32;

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
      if (V <= kExtractMax) {
        std::vector<T> y;
        for (int64_t n = r0; n < r1; ++n) {
          const int64_t* ban = o != nullptr ? e + o[n] : nullptr;
          const int64_t nban = o != nullptr ? o[n + 1] - o[n] : 0;
          row_extract(s + n * V, V, k, ban, nban, padding, ov + n * k, oc + n * k, fill, y);
        }
        return;
      }
      std::vector<uint8_t> banned(static_cast<std::size_t>(V), 0);
      std::vector<std::pair<T, int64_t>> cand;
      if (padding >= 0) banned[padding] = 1;
      for (int64_t n = r0; n < r1; ++n) {
        if (o != nullptr)
          for (int64_t i = o[n]; i < o[n + 1]; ++i) banned[e[i]] = 1;
        if (k < kGatherFromK)
          row_scan(s + n * V, V, k, banned.data(), ov + n * k, oc + n * k, fill);
        else
          row_gather(s + n * V, V, k, banned.data(), ov + n * k, oc + n * k, fill, cand);
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
