"""Top-k items and the target's rank over an item catalogue, streamed (Triton).

Math (per row n; s_v = <h_n, W_v> for the item ids v: every row of W but PAD, never stored)::

    topk:  the k largest s_v, excluded ids left out, ties to the lower id
    rank:  1 + #{v != t_n : s_v >= s_{t_n}}

Shapes: hidden h [N, D], items W [R, D] (row PAD = padding_idx is never scored: masked like a row
past the end; PAD = -1 for a table without one), one float dtype (fp32, fp16, bf16); D <= 256,
padded to a power of two >= 16 in registers; k <= 128. N, R and PAD are runtime ints. The tile scores are accumulated in fp32 and, for fp16/bf16 inputs, rounded to the
input dtype (as ``h @ W.T`` returns them), so that ties are those of the input precision.

* ``_topk_fwd_kernel``: grid (row blocks, splits of the catalogue). Each program streams its
  items in BLOCK_V tiles and keeps, per row, the K_PAD best (score, id) pairs seen so far as
  int64 keys in registers: ``key = (ordered(score) << 32) - id`` orders by score, then by lower
  id, and is unique per item (``0 <= id < 2**32``). A tile is compared with each row's current K_PAD-th key in fp32;
  only when some row of the block has a candidate does an insertion loop run (take each row's
  best candidate, replace the row's smallest key, repeat while any row has a candidate left).
  Excluded ids come as per-row sorted lists; each row's pointer walks its list along the tiles.
  Writes the K_PAD keys of each (row, split) unordered.
* ``_target_rank_fwd_kernel``: same grid; the targets' scores come from a product of the same
  shape as every tile's (column i of a [BLOCK_N, BLOCK_V] product holds row i's target), so they
  are the values the tile that holds the target computes; then each tile adds
  ``#{v != t : s_v >= s_t}`` to an int32 count per (row, split).

The launchers merge the splits in a fixed way: keys are unique, so ``torch.topk`` over the
``splits x K_PAD`` keys of a row has a single answer; counts are summed as integers. Checked
against ``spnn_fast.reference.topk`` (full scores, a stable sort, ``ranks_from_scores``) in
tests/test_topk.py, under the interpreter in fp32.

Against the evaluation's ranks (``ranks_from_scores(h @ W.T)`` with cuBLAS): the scores here are
the same products, accumulated in another order (and with "tf32x3" dots for fp32 inputs, see
``_precision``), so they can differ from cuBLAS's in the last bit; a rank moves only where another
item's score lies within that rounding of the target's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from spnn_fast.kernels import _device
from spnn_fast.kernels.distill import _precision

from spnn_fast.limits import TOPK_MAX_DIM, TOPK_MAX_K

__all__ = ["MAX_DIM", "MAX_K", "target_rank_fwd", "topk_fwd"]

MAX_DIM = TOPK_MAX_DIM
MAX_K = TOPK_MAX_K

# Keys below every real key: the smallest real one is ordered(-inf) * 2**32 - (2**32 - 1) with
# ordered(-inf) = -2139095041. FREE + slot marks the still-empty slots of a row (distinct, so the
# smallest is one slot); NONE marks "no candidate" in a tile.
_FREE = tl.constexpr(-9223372032559808512)  # (1 - 2**31) * 2**32
_NONE = tl.constexpr(-9223372032559808513)
_REAL_MIN = tl.constexpr(-2139095041 * 2**32 - (2**32 - 1))


@triton.jit
def _load_rows(PTR, idx, idx_ok, offs, D):
    mask = idx_ok[:, None] & (offs[None, :] < D)
    return tl.load(PTR + idx[:, None] * D + offs[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(h, W, ids, ok, offs_d, D, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """Scores [BLOCK_N, BLOCK_V] of the rows against items ``ids`` (fp32, rounded to the input
    dtype when ROUND)."""
    w = _load_rows(W, ids, ok, offs_d, D)
    z = tl.dot(h, tl.trans(w), input_precision=PRECISION)
    if ROUND:
        z = z.to(h.dtype).to(tl.float32)
    return z


@triton.jit
def _keys(z, ids):
    """int64 keys ordered like (score, -id): the float's bits made monotonic, then the id."""
    z = tl.where(z == 0.0, 0.0, z)  # -0.0 and +0.0 are one score
    bits = z.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) - ids[None, :]


@triton.jit
def _decode(key):
    """(score, id) of keys [BLOCK_N]; meaningless for FREE / NONE keys."""
    hi = ((key - 1) >> 32) + 1  # key = hi * 2**32 - id with 0 <= id < 2**32
    ids = (hi << 32) - key
    bits = hi.to(tl.int32)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), ids


@triton.jit
def _insert(best, thr, keys):
    """Insert each row's candidate keys (the others NONE) into its K_PAD best; ``thr`` is the
    row's smallest key. One candidate per row and round, while any row has one left."""
    top = tl.max(keys, axis=1)
    go = tl.max((top > thr).to(tl.int32), axis=0) > 0
    while go:
        ins = top > thr
        best = tl.where((best == thr[:, None]) & ins[:, None], top[:, None], best)
        thr = tl.min(best, axis=1)
        keys = tl.where((keys > thr[:, None]) & (keys != top[:, None]), keys, _NONE)
        top = tl.max(keys, axis=1)
        go = tl.max((top > thr).to(tl.int32), axis=0) > 0
    return best, thr


@triton.jit
def _drop_excluded(valid, ids, ptr, end, EX_IDS, stop):
    """Clear ``valid`` at each row's excluded ids below ``stop`` (its sorted list from ``ptr``
    to ``end``; earlier tiles consumed the smaller ids) and advance the pointers."""
    has = ptr < end
    nxt = tl.where(has, tl.load(EX_IDS + ptr, mask=has, other=0), stop)
    pending = nxt < stop
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        hit = (ids[None, :] == nxt[:, None]) & pending[:, None]
        valid = valid & (hit == 0)
        ptr = ptr + pending.to(tl.int64)
        has = ptr < end
        nxt = tl.where(has, tl.load(EX_IDS + ptr, mask=has, other=0), stop)
        pending = nxt < stop
    return valid, ptr


@triton.jit(do_not_specialize=["N", "R", "PAD", "span", "TILES"])
def _topk_fwd_kernel(
    H,
    W,
    EX_IDS,
    EX_START,
    EX_END,
    KEYS,
    N,
    R,
    PAD,
    D,
    span,
    TILES,
    SPLITS,
    HAS_EXCLUDE: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    h = _load_rows(H, rows, row_ok, offs_d, D)
    first = pid_s * span  # this split's ids: [first, last]
    last = tl.minimum(first + span - 1, R - 1)
    slot = tl.arange(0, K_PAD).to(tl.int64)
    best = tl.zeros([BLOCK_N, K_PAD], dtype=tl.int64) + slot[None, :] + _FREE
    thr = tl.min(best, axis=1)
    thr_val, thr_id = _decode(thr)
    ptr = tl.zeros([BLOCK_N], dtype=tl.int64)
    end = tl.zeros([BLOCK_N], dtype=tl.int64)
    if HAS_EXCLUDE:
        ptr = tl.load(EX_START + rows * SPLITS + pid_s, mask=row_ok, other=0)
        end = tl.load(EX_END + rows, mask=row_ok, other=0)
    for tile in range(0, TILES):
        ids = first + tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        ok = (ids <= last) & (ids != PAD)
        z = _scores(h, W, ids, ok, offs_d, D, ROUND, PRECISION)
        valid = row_ok[:, None] & ok[None, :] & (z > float("-inf"))
        if HAS_EXCLUDE:
            valid, ptr = _drop_excluded(valid, ids, ptr, end, EX_IDS, first + (tile + 1) * BLOCK_V)
        # Candidates beat the row's smallest kept (score, id), or the row has a free slot.
        free = thr < _REAL_MIN
        beats = (z > thr_val[:, None]) | (
            (z == thr_val[:, None]) & (ids[None, :] < thr_id[:, None])
        )
        cand = valid & (beats | free[:, None])
        if tl.max(tl.max(cand.to(tl.int32), axis=1), axis=0) > 0:
            keys = tl.where(cand, _keys(z, ids), _NONE)
            best, thr = _insert(best, thr, keys)
            thr_val, thr_id = _decode(thr)
    out = KEYS + (rows[:, None] * SPLITS + pid_s) * K_PAD + slot[None, :]
    tl.store(out, best, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N", "R", "PAD", "span", "TILES"])
def _target_rank_fwd_kernel(
    H,
    W,
    T,
    COUNT,
    N,
    R,
    PAD,
    D,
    span,
    TILES,
    SPLITS,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    h = _load_rows(H, rows, row_ok, offs_d, D)
    t = tl.load(T + rows, mask=row_ok, other=0)
    # The targets' scores: the diagonal of a product shaped like a tile's, whose column i is
    # row i's target (BLOCK_V >= BLOCK_N).
    cols = tl.arange(0, BLOCK_V)
    col_rows = pid_n * BLOCK_N + cols
    col_ok = (cols < BLOCK_N) & (col_rows < N)
    t_cols = tl.load(T + col_rows, mask=col_ok, other=0)
    zt = _scores(h, W, t_cols, col_ok, offs_d, D, ROUND, PRECISION)
    diag = tl.arange(0, BLOCK_N)[:, None] == cols[None, :]
    s_t = tl.sum(tl.where(diag, zt, 0.0), axis=1)
    first = pid_s * span
    last = tl.minimum(first + span - 1, R - 1)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for tile in range(0, TILES):
        ids = first + tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        ok = (ids <= last) & (ids != PAD)
        z = _scores(h, W, ids, ok, offs_d, D, ROUND, PRECISION)
        hit = (z >= s_t[:, None]) & ok[None, :] & (ids[None, :] != t[:, None])
        count += tl.sum(hit.to(tl.int32), axis=1)
    tl.store(COUNT + rows * SPLITS + pid_s, count, mask=row_ok)


# ------------------------------------------------------------------------------ launchers
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _k_pad(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def _config(block_d: int, k_pad: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) of the top-k kernel: the kept keys ([BLOCK_N, K_PAD] int64)
    and a tile's keys live in registers, so the row block narrows as k or D grows, sized so that
    fp16/bf16 never spill (``benchmarks/kernel_stats.py`` compiles every variant; fp32 at
    D > 64 may)."""
    if block_d > 64:
        return 32, 64, 8
    return (64 if k_pad <= 32 else 32), 64, 4


def _rank_config(block_d: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) of the rank kernel (BLOCK_V >= BLOCK_N, see the kernel);
    spills as the top-k kernel's (see :func:`_config`)."""
    return (32, 64, 8) if block_d > 64 else (64, 64, 4)


def _splits(n_blocks: int, r: int, block_v: int, device: torch.device, splits: Optional[int]):
    """(splits, span, tiles per split) over the ``r`` rows of the table: on a GPU, enough splits
    of the catalogue that the grid gives every SM two programs (small N), each split at least 8
    tiles long."""
    tiles = triton.cdiv(r, block_v)
    if splits is None:
        splits = 1
        sms = _device.multiprocessor_count(device)
        if sms is not None:
            splits = max(1, min(triton.cdiv(2 * sms, n_blocks), tiles // 8))
    splits = max(1, min(int(splits), tiles))
    per = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per)  # no empty split
    return splits, per * block_v, per


def _check(hidden: torch.Tensor, items: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton top-k kernels take fp32/fp16/bf16, got {hidden.dtype}")
    if hidden.shape[1] > MAX_DIM:
        raise ValueError(f"hidden has {hidden.shape[1]} features; the kernels take <= {MAX_DIM}")


def _sorted_exclusions(offsets, ids, n, r, splits, span):
    """Each row's excluded ids (in ``[0, r)``) sorted, and where each (row, split) starts in
    them."""
    counts = offsets.diff().long()
    # output_size: the counts sum to len(ids) (checked by the caller); no device sync for it
    row_of = torch.repeat_interleave(
        torch.arange(n, device=ids.device), counts, output_size=ids.numel()
    )
    comp = (row_of * r + ids.long()).sort().values
    ids_sorted = (comp - row_of * r).contiguous()  # sorting keeps the rows' order
    first = torch.arange(splits, device=ids.device) * span
    query = torch.arange(n, device=ids.device)[:, None] * r + first[None, :]
    start = torch.searchsorted(comp, query.contiguous()).contiguous()
    # A fresh tensor, not a view one element in: its address is 16-byte aligned, as the kernel
    # is specialized for (and as kernel_stats compiles it).
    return ids_sorted, start, offsets[1:].long().clone()


def _decode_keys(keys: torch.Tensor, empty_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values float32, ids int64) of keys; empty slots become (-inf, empty_id)."""
    hi = (keys + (2**32 - 1)) >> 32
    ids = (hi << 32) - keys
    bits = hi.to(torch.int32)
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    values = bits.view(torch.float32)
    empty = keys < _REAL_MIN.value
    return values.masked_fill(empty, float("-inf")), ids.masked_fill(empty, empty_id)


def topk_fwd(
    hidden: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_ids: Optional[torch.Tensor] = None,
    *,
    padding_idx: Optional[int] = 0,
    splits: Optional[int] = None,
    block: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k] in the input dtype, indices [N, k] int64), descending, ties to the lower
    id; the row ``padding_idx`` (None: none) is never returned, empty slots hold -inf and
    ``padding_idx`` (-1 without one).

    ``splits`` (catalogue splits per row block) and ``block=(BLOCK_N, BLOCK_V)`` override the
    defaults (tests use them to cover the split merge and tile edges).
    """
    _check(hidden, items)
    if k > MAX_K:
        raise ValueError(f"k={k}: the Triton top-k kernel keeps k <= {MAX_K}")
    h, w = hidden.contiguous(), items.contiguous()
    n, r, d = h.shape[0], w.shape[0], h.shape[1]
    pad = -1 if padding_idx is None else padding_idx
    values = torch.full((n, k), float("-inf"), dtype=h.dtype, device=h.device)
    indices = torch.full((n, k), pad, dtype=torch.int64, device=h.device)
    if n == 0:
        return values, indices
    bd, k_pad = _block_d(d), _k_pad(k)
    block_n, block_v, warps = _config(bd, k_pad)
    if block is not None:
        block_n, block_v = block
    n_blocks = triton.cdiv(n, block_n)
    n_splits, span, tiles = _splits(n_blocks, r, block_v, h.device, splits)
    keys = torch.empty((n, n_splits, k_pad), dtype=torch.int64, device=h.device)
    has_ex = exclude_offsets is not None and exclude_ids.numel() > 0
    ex = (h, h, h)  # never read without exclusions
    if has_ex:
        ex = _sorted_exclusions(exclude_offsets, exclude_ids, n, r, n_splits, span)
    _topk_fwd_kernel[(n_blocks, n_splits)](
        h, w, *ex, keys, n, r, pad, d, span, tiles, n_splits,
        HAS_EXCLUDE=has_ex, ROUND=h.dtype != torch.float32, BLOCK_N=block_n, BLOCK_V=block_v,
        BLOCK_D=bd, K_PAD=k_pad, PRECISION=_precision(h.dtype), num_warps=warps,
    )  # fmt: skip
    flat = keys.view(n, n_splits * k_pad)
    top = torch.topk(flat, min(k, flat.shape[1]), dim=1, sorted=True).values
    vals, ids = _decode_keys(top, pad)
    values[:, : top.shape[1]] = vals  # exact: the scores were rounded to the input dtype
    indices[:, : top.shape[1]] = ids
    return values, indices


def target_rank_fwd(
    hidden: torch.Tensor,
    items: torch.Tensor,
    target: torch.Tensor,
    *,
    padding_idx: Optional[int] = 0,
    splits: Optional[int] = None,
    block: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """1-based ranks [N] int64 (ties count against the target) among every row but
    ``padding_idx`` (None: all rows). ``splits`` and ``block=(BLOCK_N, BLOCK_V)``
    (BLOCK_V >= BLOCK_N) override the defaults."""
    _check(hidden, items)
    h, w = hidden.contiguous(), items.contiguous()
    t = target.long().contiguous()
    n, r, d = h.shape[0], w.shape[0], h.shape[1]
    pad = -1 if padding_idx is None else padding_idx
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=h.device)
    bd = _block_d(d)
    block_n, block_v, warps = _rank_config(bd)
    if block is not None:
        block_n, block_v = block
    if block_v < block_n:
        raise ValueError(f"block={block}: BLOCK_V must be >= BLOCK_N")
    n_blocks = triton.cdiv(n, block_n)
    n_splits, span, tiles = _splits(n_blocks, r, block_v, h.device, splits)
    count = torch.empty((n, n_splits), dtype=torch.int32, device=h.device)
    _target_rank_fwd_kernel[(n_blocks, n_splits)](
        h, w, t, count, n, r, pad, d, span, tiles, n_splits,
        ROUND=h.dtype != torch.float32, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=bd,
        PRECISION=_precision(h.dtype), num_warps=warps,
    )  # fmt: skip
    return count.sum(dim=1, dtype=torch.int64) + 1
