"""Batch encoder, vectorized numpy definition (the ``backend="torch"`` fallback and test oracle).

For row ``b`` with user ``u = rows[b]`` and end ``e = ends[b]``, the window is the user's events at
positions ``p`` in ``[s, e)`` with ``s = max(0, e - L)`` (``n = e - s`` events), placed in the last
``n`` columns (``pad_left``) or the first ``n``; every output is 0 (``False``) at padding, but
``targets``, which hold ``ignore_index`` there.

* ``items[b, j]``, ``timestamps[b, j]``: the event's item and time; ``mask[b, j]``: True.
* ``time_buckets[b, j]``: 0 if ``p == 0``, else ``min(NB - 1, bit_length(t[p] - t[p - 1]))``; the
  gap reaches back to the event before the window. Gaps are taken modulo 2**64 as unsigned, so a
  gap >= 2**63 (timestamps spanning more than the int64 range) still gets ``bit_length`` 64.
* ``targets[b, j]``: the user's item at ``p + 1`` when ``p + 1 < target_ends[b]`` (and the user
  has that event), else ``ignore_index`` (never an item id; PyTorch's -100 by default).
* ``negatives[b, j, k]`` (``K = num_negatives > 0``): at slots with a target ``T``, an item
  uniform on ``[1, V] \\ {T}``, from a counter-based generator (independent of threading)::

      splitmix64(x) = mix(x + 0x9E3779B97F4A7C15)      (one step of SplitMix64 from state x)
      mix(z)        = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                      z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)   (mod 2**64)
      seed_mix      = splitmix64(seed mod 2**64)
      h             = splitmix64(seed_mix + ((b * L + j) * K + k))        (mod 2**64)
      idx           = min(V - 2, int64(double(h >> 11) * 2**-53 * double(V - 1)))
      item          = idx + 1;  item += (item >= T)

  The product ``double(h >> 11) * 2**-53`` is exact, and one IEEE multiply by ``double(V - 1)``
  follows, so numpy and C++ agree bit for bit. Slots without a target hold 0.

Only the events a row reads are checked: items of the window and of its targets must lie in
``[1, V]`` and timestamps must not decrease over the pairs ``(p - 1, p)``, ``p`` in
``[max(s, 1), e)``. The error names the smallest offending global index (item errors first), with
the same message as the C++ encoder. The O(U + B) argument checks live in ``spnn_fast.encode``.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from spnn_fast.reference.time_bucket import time_bucket_np

__all__ = [
    "encode_batch_ref",
    "mix_seed",
    "negatives_ref",
    "pad_sequence_collate",
    "splitmix64_np",
    "window_slices",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """One SplitMix64 step from state ``x`` (uint64 array, wrapping arithmetic); a new array."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def mix_seed(seed: int) -> int:
    """``seed_mix = splitmix64(seed mod 2**64)`` as a Python int."""
    return int(splitmix64_np(np.array([int(seed) & _MASK64], dtype=np.uint64))[0])


def negatives_ref(
    targets: np.ndarray, num_items: int, num_negatives: int, seed_mix: int, first_row: int = 0
) -> np.ndarray:
    """Negatives ``[B, L, K]`` for int64 ``targets [B, L]`` (a target outside ``[1, V]``: none)
    whose first row is row ``first_row`` of the batch, from ``seed_mix = mix_seed(seed)`` (see the
    module docstring)."""
    bsz, length = targets.shape
    k = num_negatives
    flat_targets = targets.reshape(-1)
    # counter = (b * L + j) * K + kk: the slot's flat index in the [B, L, K] output.
    counters = np.arange(k * bsz * length, dtype=np.uint64)
    counters += np.uint64((seed_mix + first_row * length * k) & _MASK64)
    h = splitmix64_np(counters)
    h >>= np.uint64(11)
    u = h.astype(np.float64)
    u *= 2.0**-53
    u *= float(num_items - 1)
    idx = u.astype(np.int64).reshape(-1, k)
    np.minimum(idx, num_items - 2, out=idx)
    idx += 1
    idx += idx >= flat_targets[:, None]
    idx *= ((flat_targets - 1).view(np.uint64) < num_items)[:, None]
    return idx.reshape(bsz, length, k)


# Rows are encoded in chunks of about this many slots, so that numpy's temporaries stay in cache
# instead of streaming [B, L] arrays through memory a dozen times.
_CHUNK_SLOTS = 1 << 14


def encode_batch_ref(
    offsets: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    rows: np.ndarray,
    ends: np.ndarray,
    target_ends: np.ndarray,
    max_len: int,
    num_items: int,
    num_time_buckets: int,
    num_negatives: int,
    seed: int,
    pad_left: bool,
    ignore_index: int = -100,
) -> Tuple[np.ndarray, ...]:
    """The encoder on validated 1-D int64 arrays; returns numpy ``(items, timestamps,
    time_buckets, mask, targets, negatives or None)``.

    ``rows``/``ends`` must already satisfy ``0 <= rows < U`` and ``1 <= ends <= len(user)``
    (``spnn_fast.encode.encode_batch`` checks them); items and timestamps read are checked here.
    """
    bsz, length, k = len(rows), int(max_len), int(num_negatives)
    out = [np.empty((bsz, length), dtype=np.int64) for _ in range(5)]
    out[3] = np.empty((bsz, length), dtype=bool)
    negatives = np.empty((bsz, length, k), dtype=np.int64) if k > 0 else None
    seed_mix = mix_seed(seed)
    bad_item = bad_time = len(items)  # smallest offending global index seen (len: none)
    step = max(1, _CHUNK_SLOTS // length)
    for b0 in range(0, bsz, step):
        b1 = min(bsz, b0 + step)
        chunk = [o[b0:b1] for o in out] + [None if negatives is None else negatives[b0:b1]]
        i, t = _encode_rows(
            offsets, items, timestamps, rows[b0:b1], ends[b0:b1], target_ends[b0:b1], length,
            num_items, num_time_buckets, pad_left, chunk, b0, seed_mix, ignore_index,
        )  # fmt: skip
        bad_item, bad_time = min(bad_item, i), min(bad_time, t)
    if bad_item < len(items):
        raise ValueError(f"items[{bad_item}]={int(items[bad_item])} is outside [1, {num_items}]")
    if bad_time < len(items):
        raise ValueError(
            f"timestamps decrease within a user at index {bad_time}: "
            f"{int(timestamps[bad_time])} < {int(timestamps[bad_time - 1])}"
        )
    return (*out, negatives)


def _encode_rows(
    offsets, items, timestamps, rows, ends, target_ends, length, num_items, num_buckets, pad_left,
    out, b0, seed_mix, ignore_index,
) -> Tuple[int, int]:  # fmt: skip
    """Fills ``out`` (views of rows ``b0 ..``) and returns the smallest bad item and bad time
    indices (``len(items)`` when none)."""
    out_items, out_times, buckets, mask, targets, negatives = out
    start_user = offsets[rows]
    len_user = offsets[rows + 1] - start_user
    s = np.maximum(ends - length, 0)
    n = ends - s
    # pos[b, j]: the user position shown in column j; outside [s, e) at padding.
    first = s - (length - n) if pad_left else s
    pos = first[:, None] + np.arange(length, dtype=np.int64)
    np.greater_equal(pos, s[:, None], out=mask)
    mask &= pos < ends[:, None]
    has_next = mask & (pos + 1 < np.minimum(target_ends, len_user)[:, None])
    has_prev = mask & (pos > 0)
    # Global event index, 0 at padding; +1 / -1 only where a next / previous event exists, so
    # every gather stays in bounds and the gap where there is no previous event is 0.
    gidx = pos
    gidx += start_user[:, None]
    gidx *= mask
    np.take(items, gidx, out=out_items)
    np.take(timestamps, gidx, out=out_times)
    np.take(items, gidx + has_next, out=targets)
    prev = np.take(timestamps, gidx - has_prev)

    # Items read (window and next events) must lie in [1, V]: x - 1 < V as unsigned.
    none = len(items)
    bad_item = bad_time = none
    bad = ((out_items - 1).view(np.uint64) >= num_items) & mask
    if bad.any():
        bad_item = int(gidx[bad].min())
    bad = ((targets - 1).view(np.uint64) >= num_items) & has_next
    if bad.any():
        bad_item = min(bad_item, int(gidx[bad].min()) + 1)
    bad = out_times < prev  # equal where there is no previous event
    if bad.any():
        bad_time = int(gidx[bad].min())

    gaps = out_times - prev  # wraps to < 0 for true gaps >= 2**63, whose bit_length is 64
    buckets[...] = time_bucket_np(gaps, num_buckets)
    huge = gaps < 0
    if huge.any():
        buckets[huge] = min(64, num_buckets - 1)
    out_items *= mask
    out_times *= mask
    np.copyto(targets, ignore_index, where=~has_next)
    if negatives is not None:
        negatives[...] = negatives_ref(
            targets, num_items, negatives.shape[2], seed_mix, first_row=b0
        )
    return bad_item, bad_time


def window_slices(
    offsets: np.ndarray, rows: np.ndarray, ends: np.ndarray, max_len: int
) -> List[slice]:
    """The global event slice of each row's window (``[start + max(0, e - L), start + e)``)."""
    start = offsets[rows]
    lo = start + np.maximum(ends - max_len, 0)
    hi = start + ends
    return [slice(a, b) for a, b in zip(lo.tolist(), hi.tolist())]


def pad_sequence_collate(
    item_windows: List[torch.Tensor], time_windows: List[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conventional collate of per-sample windows: right-padded ``(items, timestamps, mask)``
    via ``torch.nn.utils.rnn.pad_sequence``. Benchmark baseline (no buckets, targets, negatives).
    """
    items = torch.nn.utils.rnn.pad_sequence(item_windows, batch_first=True)
    times = torch.nn.utils.rnn.pad_sequence(time_windows, batch_first=True)
    lengths = torch.tensor([len(w) for w in item_windows], dtype=torch.int64)
    mask = torch.arange(items.shape[1]) < lengths[:, None]
    return items, times, mask
