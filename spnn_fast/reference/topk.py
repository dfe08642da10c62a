"""Top-k items and the target's rank over an item catalogue, in plain PyTorch.

Shapes: hidden ``h [N, D]``, items ``W [R, D]`` (row ``i`` is item id ``i``). The row
``padding_idx`` (0 by default, as ``SPNN.item_emb``; None for a table without one) is never
returned nor ranked, as in ``SPNN.score``; the items are the other rows. The scores are
``s = h @ W.T`` computed in the input dtype (as model code writes it), then compared in that
precision.

* ``topk``: per row, the ``k`` highest-scoring items minus the row's excluded items, in
  descending score, ties broken by the lower item id. Slots that no item fills (fewer than ``k``
  items remain, or the rest score ``-inf``) hold id ``padding_idx`` (-1 without one) and
  ``-inf``. Values are in the input dtype (the scores' own values).
* ``rank``: per row with target ``t``, ``1 + #{items v != t : s_v >= s_t}`` (ties count
  against the target), the rule of :func:`spnn_fast.metrics.ranks_from_scores`.

Three kinds of function live here:

* :func:`topk_scores_reference` / :func:`target_rank_reference` form the ``N x (V + 1)`` scores:
  the test oracles (exact tie rule by a stable sort; ``ranks_from_scores`` itself).
* :func:`topk_scores_naive`: ``torch.topk(h @ W.T, k)`` as a user would write it, the benchmark
  baseline (its tie order is whatever ``torch.topk`` gives); :func:`target_rank_naive`, the rank
  formula on the full scores, the compiled baseline of the rank.
* :func:`topk_scores_chunked` / :func:`target_rank_chunked`: the ``backend="torch"`` path. It
  visits the scores in ``rows x cols`` chunks sized from a byte budget (:func:`chunk_plan`), so its
  extra memory is ``O(budget + N k)``, never ``O(N V)``.

Matching the evaluation's ranks: the evaluation ranks ``model.score(hidden)``, one matmul over
the whole table. When a row chunk holds the whole table, the chunked path makes that same matmul
call, so its scores, and
its ranks, are bitwise the evaluation's. With several column chunks, the target's score is
still taken from the chunk matmul that holds the target (:func:`target_rank_chunked`), so every
comparison is between scores of one kind; a BLAS may round a chunk's product differently from
the full product in the last bit, which can only move a rank where another item's score lies
within that rounding of the target's. Chunks never have a single row or column (unless the
input does): BLAS libraries route those to matrix-vector kernels that round differently.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from spnn_fast import _ext
from spnn_fast.metrics import ranks_from_scores

__all__ = [
    "MIN_CHUNK_ROWS",
    "TOPK_BUDGET_BYTES",
    "chunk_plan",
    "empty_id",
    "full_scores",
    "target_rank_chunked",
    "target_rank_naive",
    "target_rank_reference",
    "topk_scores_chunked",
    "topk_scores_naive",
    "topk_scores_reference",
]

# Bytes of chunk temporaries (the scores of one chunk and, for the rank, a float32 mask of the
# same shape) held at once.
TOPK_BUDGET_BYTES = 128 * 2**20
# Widest chunk: a float32 sum of 0/1 values is exact below 2**24.
_MAX_CHUNK_COLS = 2**24
# Rows per chunk below which the catalogue is split instead (thin row chunks turn the matmuls
# into matrix-vector products that re-read the whole table for every few rows).
MIN_CHUNK_ROWS = 256

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- oracles, baseline
def empty_id(padding_idx: Optional[int]) -> int:
    """The id of a slot no item fills: the padding row's, -1 for a table without one."""
    return -1 if padding_idx is None else padding_idx


def full_scores(hidden: Tensor, items: Tensor, padding_idx: Optional[int] = 0) -> Tensor:
    """``hidden @ items.T`` (input dtype) with column ``padding_idx`` set to -inf: with the
    default 0, ``SPNN.score``'s values."""
    scores = hidden @ items.T
    if padding_idx is not None:
        scores[:, padding_idx] = _NEG_INF
    return scores


def _exclude_dense(scores: Tensor, offsets: Optional[Tensor], ids: Optional[Tensor]) -> Tensor:
    if offsets is None:
        return scores
    rows = torch.repeat_interleave(
        torch.arange(scores.shape[0], device=scores.device), offsets.diff().long()
    )
    scores[rows, ids.long()] = _NEG_INF
    return scores


def topk_scores_reference(
    hidden: Tensor,
    items: Tensor,
    k: int,
    exclude_offsets: Optional[Tensor] = None,
    exclude_ids: Optional[Tensor] = None,
    padding_idx: Optional[int] = 0,
) -> Tuple[Tensor, Tensor]:
    """The definition: full scores, excluded items at -inf, a stable descending sort (so equal
    scores keep the lower id first), the first ``k``; -inf slots take the id
    :func:`empty_id`. No validation."""
    scores = full_scores(hidden, items, padding_idx)
    scores = _exclude_dense(scores, exclude_offsets, exclude_ids)
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    values, indices = values[:, :k], indices[:, :k]
    return values, indices.masked_fill(values == _NEG_INF, empty_id(padding_idx))


def topk_scores_naive(hidden: Tensor, items: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``torch.topk`` of the full scores (what code without a fused top-k writes); the benchmark
    baseline. Ties come in ``torch.topk``'s order, values in the input dtype."""
    return torch.topk(full_scores(hidden, items), k, dim=1)


def target_rank_naive(hidden: Tensor, items: Tensor, target: Tensor) -> Tensor:
    """The rank formula on the full scores without ``ranks_from_scores``'s checks (whose
    data-dependent branches ``torch.compile`` cannot trace): the compiled benchmark baseline."""
    scores = full_scores(hidden, items)
    return (scores[:, 1:] >= scores.gather(1, target[:, None])).sum(dim=1)


def target_rank_reference(
    hidden: Tensor, items: Tensor, target: Tensor, padding_idx: Optional[int] = 0
) -> Tensor:
    """The evaluation's ranks: :func:`~spnn_fast.metrics.ranks_from_scores` of the full scores
    (as ``evaluate`` calls it on ``model.score(hidden).float()``). Oracle and baseline. Another
    ``padding_idx`` moves the padding column first (a column of -inf without one) and renumbers
    the targets to match, so the rule is the same function's."""
    scores = full_scores(hidden, items, padding_idx).float()
    if padding_idx is None:
        pad = scores.new_full((scores.shape[0], 1), _NEG_INF)
        return ranks_from_scores(torch.cat([pad, scores], dim=1), target + 1)
    if padding_idx != 0:
        order = torch.arange(scores.shape[1], device=scores.device)
        order = torch.cat([order[padding_idx : padding_idx + 1], order[order != padding_idx]])
        target = target + (target < padding_idx).long()  # the columns before it move up by one
        scores = scores[:, order]
    return ranks_from_scores(scores, target)


# ---------------------------------------------------------------------------- chunking
def chunk_plan(
    n: int, cols: int, elem_size: int, budget: Optional[int] = None, mask_bytes: int = 4
) -> Tuple[int, int]:
    """``(rows, cols)`` of one score chunk over ``n`` rows and ``cols = V + 1`` table rows.

    The temporaries (scores of ``elem_size`` bytes and a mask of ``mask_bytes`` per element: the
    rank's float32 0/1, none for the top-k) stay within
    ``budget`` bytes (default :data:`TOPK_BUDGET_BYTES`, read at call time): the whole table per
    row chunk while at least ``min(n, MIN_CHUNK_ROWS)`` rows fit, else ``MIN_CHUNK_ROWS`` rows and
    as many columns as fit (at least 2, at most 2**24). :func:`_spans` may widen the last chunk
    by one.
    """
    budget = TOPK_BUDGET_BYTES if budget is None else budget
    elems = max(1, budget // (elem_size + mask_bytes))
    if cols <= _MAX_CHUNK_COLS:
        if n * cols <= elems:
            return max(n, 1), cols
        rows = elems // cols
        if rows >= min(n, MIN_CHUNK_ROWS):
            return min(rows, n), cols
    rows = max(1, min(n, MIN_CHUNK_ROWS))
    return rows, min(cols, _MAX_CHUNK_COLS, max(2, elems // rows))


def _spans(total: int, step: int) -> List[Tuple[int, int]]:
    """``[a, b)`` spans of ``step`` covering ``total``; a last span of one is merged into the one
    before (a single row or column would take the BLAS's matrix-vector route)."""
    spans = [(a, min(a + step, total)) for a in range(0, total, step)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], total)]
    return spans


class _Buffer:
    """One flat buffer reused by every chunk (fresh temporaries per chunk fragment the heap)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.empty((rows + 1) * (cols + 1), dtype=dtype, device=device)

    def take(self, r: int, c: int) -> Tensor:
        return self.buf[: r * c].view(r, c)


def _plan(hidden: Tensor, items: Tensor, chunk: Optional[Tuple[int, int]], mask_bytes: int = 4):
    n, cols = hidden.shape[0], items.shape[0]
    rows, step = chunk or chunk_plan(n, cols, hidden.element_size(), mask_bytes=mask_bytes)
    return _spans(n, rows), _spans(cols, step), rows, step


# ---------------------------------------------------------------------------- top-k
def _order_keys(values: Tensor, indices: Tensor) -> Tensor:
    """int64 keys ordered like (value, -index), one per (value, index) pair: the float32 bits
    made monotonic in the high half, the index subtracted (``0 <= index < 2**32``)."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 and +0.0 are one score
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered << 32) - indices


def _select(values: Tensor, indices: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The best ``min(k, width)`` candidates of each row (indices distinct within a row), ordered
    by descending value, equal values by ascending index."""
    k = min(k, values.shape[1])
    if values.dtype != torch.float64:  # fp32 and the half types fit the int64 keys exactly
        pos = torch.topk(_order_keys(values, indices), k, dim=1, sorted=True).indices
        return values.gather(1, pos), indices.gather(1, pos)
    indices, perm = indices.sort(dim=1)
    values, perm2 = values.gather(1, perm).sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, perm2[:, :k])


def _chunk_topk(z: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The chunk's best ``min(k, cols)`` columns under the tie rule (in no particular order).

    ``torch.topk`` returns equal values in no promised order, so it is asked for ``k + 1``: a row
    whose ``k``-th and ``(k + 1)``-th values differ has a unique answer; a row where they are
    equal (a tie across the cut) takes all columns above the ``k``-th value and then the lowest
    columns equal to it.
    """
    cols = z.shape[1]
    if cols <= k:
        return z.clone(), torch.arange(cols, device=z.device).expand(z.shape[0], cols)
    values, idx = torch.topk(z, k + 1, dim=1, sorted=True)
    cut = values[:, k - 1]
    tie = (values[:, k] == cut) & (cut > _NEG_INF)
    values, idx = values[:, :k], idx[:, :k]
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        zr, tr = z[rows], cut[rows, None]
        above = zr > tr
        equal = zr == tr
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (equal & (equal.cumsum(dim=1) <= room))
        fixed = take.nonzero()[:, 1].view(len(rows), k)  # row-major: ascending columns
        idx = idx.index_copy(0, rows, fixed)
        values = values.index_copy(0, rows, zr.gather(1, fixed))
    return values, idx


class _Exclusions:
    """A row chunk's excluded ``(row, item)`` pairs sorted by item, so that each column chunk
    finds its own with two binary searches."""

    def __init__(self, offsets: Optional[Tensor], ids: Optional[Tensor], r0: int, r1: int):
        self.empty = True
        if offsets is None:
            return
        e0, e1 = int(offsets[r0]), int(offsets[r1])
        if e1 == e0:
            return
        counts = offsets[r0 : r1 + 1].diff().long()
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=offsets.device), counts)
        cols = ids[e0:e1].long()
        cols, order = cols.sort()
        self.rows, self.cols, self.empty = rows[order], cols, False

    def apply(self, z: Tensor, c0: int, c1: int) -> None:
        if self.empty:
            return
        bounds = torch.tensor([c0, c1], device=self.cols.device)
        a, b = torch.searchsorted(self.cols, bounds).tolist()
        if b > a:
            z[self.rows[a:b], self.cols[a:b] - c0] = _NEG_INF


@torch.no_grad()
def topk_scores_chunked(
    hidden: Tensor,
    items: Tensor,
    k: int,
    exclude_offsets: Optional[Tensor] = None,
    exclude_ids: Optional[Tensor] = None,
    padding_idx: Optional[int] = 0,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor]:
    """``(values [N, k] in the input dtype, indices [N, k] int64)`` chunk by chunk (see the
    module docstring). ``chunk=(rows, cols)`` overrides :func:`chunk_plan`. Inputs are assumed
    valid."""
    n = hidden.shape[0]
    fill = empty_id(padding_idx)
    row_spans, col_spans, rows, cols = _plan(hidden, items, chunk, mask_bytes=0)
    if n and len(row_spans) == 1 and len(col_spans) == 1:
        return _topk_whole(hidden, items, k, exclude_offsets, exclude_ids, padding_idx, fill)
    values = torch.full((n, k), _NEG_INF, dtype=hidden.dtype, device=hidden.device)
    indices = torch.full((n, k), fill, dtype=torch.int64, device=hidden.device)
    if n == 0:
        return values, indices
    buf = _Buffer(rows, cols, hidden.dtype, hidden.device)
    for r0, r1 in row_spans:
        h = hidden[r0:r1]
        excluded = _Exclusions(exclude_offsets, exclude_ids, r0, r1)
        cand_v, cand_i = [], []  # each column chunk's best k: the row chunk's best k is among them
        for c0, c1 in col_spans:
            z = torch.matmul(h, items[c0:c1].T, out=buf.take(r1 - r0, c1 - c0))
            if padding_idx is not None and c0 <= padding_idx < c1:
                z[:, padding_idx - c0] = _NEG_INF
            excluded.apply(z, c0, c1)
            v, i = _chunk_topk(z, k)
            cand_v.append(v)
            cand_i.append(i + c0)
            if len(cand_v) == 16:  # keep the candidate lists short
                v, i = _select(torch.cat(cand_v, 1), torch.cat(cand_i, 1), k)
                cand_v, cand_i = [v], [i]
        v, i = _select(torch.cat(cand_v, 1), torch.cat(cand_i, 1), k)
        got = v.shape[1]  # < k only when the whole table has fewer than k columns after all
        values[r0:r1, :got] = v
        indices[r0:r1, :got] = i.masked_fill(v == _NEG_INF, fill)
    return values, indices


# Score matrices below this many entries are scanned on one thread: a second one would wait on
# the core the matrix product's OpenMP threads still spin on (943 x 1,000 scores: the rank scan
# 0.93 ms on one thread, 1.69 ms on two; docs/benchmarks.md).
_ONE_THREAD_BELOW = 1 << 22


def _scan_threads(z: Tensor) -> int:
    return 1 if z.numel() < _ONE_THREAD_BELOW else torch.get_num_threads()


def _cpp_rows(t: Tensor) -> bool:
    """Whether the C++ row scans (``spnn_fast._C.topk_rows`` / ``rank_rows``) serve ``t``'s
    scores: a float32 or float64 CPU tensor, the extension loaded."""
    return _ext.C is not None and t.device.type == "cpu" and t.dtype in (torch.float32,
                                                                         torch.float64)  # fmt: skip


def _topk_whole(hidden, items, k, exclude_offsets, exclude_ids, padding_idx, fill):
    """:func:`topk_scores_chunked` when the whole score matrix fits the budget: one product,
    the exclusions written into it directly (a chunk plan's sorting of them buys nothing here),
    one top-k: the work of ``matmul`` + mask + ``torch.topk``, and the tie rule."""
    z = hidden @ items.T
    if _cpp_rows(z):
        # one pass per row: exclusions, padding, the best k and the tie rule
        offsets = None if exclude_offsets is None else exclude_offsets.long().contiguous().numpy()
        ids = None if exclude_ids is None else exclude_ids.long().contiguous().numpy()
        pad = -1 if padding_idx is None else padding_idx
        v, i = _ext.C.topk_rows(z.numpy(), k, offsets, ids, pad, fill, _scan_threads(z))
        return torch.from_numpy(v), torch.from_numpy(i)
    if padding_idx is not None:
        z[:, padding_idx] = _NEG_INF
    if exclude_offsets is not None and exclude_ids is not None and exclude_ids.numel():
        counts = exclude_offsets.diff().long()
        rows = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), counts)
        z[rows, exclude_ids.long()] = _NEG_INF
    if z.shape[1] > k:
        # torch.topk's sorted order is the answer unless two kept scores are equal, or the k-th
        # equals the (k + 1)-th: then the tie rule decides (one check for both, on [N, k + 1])
        values, idx = torch.topk(z, k + 1, dim=1, sorted=True)
        if not bool((values[:, 1:] == values[:, :-1]).any()):
            v = values[:, :k].contiguous()
            return v, idx[:, :k].masked_fill(v == _NEG_INF, fill)
    v, i = _select(*_chunk_topk(z, k), k)
    got = v.shape[1]  # < k only when the whole table has fewer than k columns
    if got < k:
        v = torch.cat([v, v.new_full((v.shape[0], k - got), _NEG_INF)], 1)
        i = torch.cat([i, i.new_full((i.shape[0], k - got), fill)], 1)
    return v, i.masked_fill(v == _NEG_INF, fill)


# ---------------------------------------------------------------------------- target rank
def _target_score_guess(h: Tensor, items: Tensor, target: Tensor) -> Tensor:
    """The targets' scores by one matmul of the rows against their own targets' embeddings (the
    diagonal of ``h @ items[target].T``): the same kind of product as the chunks', so it usually
    equals the chunk's value bitwise; :func:`target_rank_chunked` checks it against the chunk."""
    return torch.diagonal(h @ items[target].T).clone()


@torch.no_grad()
def target_rank_chunked(
    hidden: Tensor,
    items: Tensor,
    target: Tensor,
    padding_idx: Optional[int] = 0,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """1-based ranks ``[N]`` int64 chunk by chunk (see the module docstring).

    A row chunk that holds the whole table takes the target's score from its own scores. With
    several column chunks the counts need the target's score before the chunk that holds it is
    reached: a guess (:func:`_target_score_guess`) is used, checked against the chunk's value when
    that chunk comes, and a row chunk whose guesses were not all bitwise right is counted again
    with the chunk's values (same shapes, so the same scores). ``chunk=(rows, cols)`` overrides
    :func:`chunk_plan`. Inputs are assumed valid.
    """
    n = hidden.shape[0]
    ranks = torch.empty(n, dtype=torch.int64, device=hidden.device)
    if n == 0:
        return ranks
    row_spans, col_spans, rows, cols = _plan(hidden, items, chunk)
    buf = _Buffer(rows, cols, hidden.dtype, hidden.device)
    # 0/1 in float32: a float sum adds no temporary (a sum over bools converts them to int64
    # first), and it is exact for counts below 2**24 (chunk_plan keeps chunks narrower)
    mask = _Buffer(rows, cols, torch.float32, hidden.device)
    target = target.long()
    for r0, r1 in row_spans:
        h, t = hidden[r0:r1], target[r0:r1]
        if len(col_spans) == 1 and _cpp_rows(h):
            z = h @ items.T
            pad = -1 if padding_idx is None else padding_idx
            ranks[r0:r1] = torch.from_numpy(
                _ext.C.rank_rows(z.numpy(), t.contiguous().numpy(), pad, _scan_threads(z))
            )
            continue
        if len(col_spans) == 1:
            z = torch.matmul(h, items.T, out=buf.take(r1 - r0, items.shape[0]))
            s_t = z.gather(1, t[:, None])
            ge = torch.ge(z, s_t, out=mask.take(r1 - r0, items.shape[0]))
            # the target's own column gives the "1 +"; the padding column is never counted
            ranks[r0:r1] = (ge.sum(dim=1) - _padding_column(ge, padding_idx, 0)).long()
            continue
        guess = _target_score_guess(h, items, t)
        args = (h, items, t, col_spans, buf, mask, padding_idx)
        count, exact = _count_at_least(guess, *args)
        if not torch.equal(exact, guess):
            count, _ = _count_at_least(exact, *args)
        ranks[r0:r1] = count
    return ranks


def _padding_column(ge: Tensor, padding_idx: Optional[int], c0: int):
    """The padding column of a chunk ``ge`` whose first column is ``c0`` (0 if it has none)."""
    if padding_idx is None or not c0 <= padding_idx < c0 + ge.shape[1]:
        return 0
    return ge[:, padding_idx - c0]


def _count_at_least(s_t, h, items, t, col_spans, buf, mask, padding_idx):
    """(#{items v : s_v >= s_t[row]} per row, each target's score as its chunk computed it)."""
    r = h.shape[0]
    count = torch.zeros(r, dtype=torch.int64, device=h.device)
    exact = s_t.clone()
    for c0, c1 in col_spans:
        z = torch.matmul(h, items[c0:c1].T, out=buf.take(r, c1 - c0))
        ge = torch.ge(z, s_t[:, None], out=mask.take(r, c1 - c0))
        count += (ge.sum(dim=1) - _padding_column(ge, padding_idx, c0)).long()
        here = ((t >= c0) & (t < c1)).nonzero().squeeze(1)
        exact[here] = z[here, t[here] - c0]
    return count, exact
