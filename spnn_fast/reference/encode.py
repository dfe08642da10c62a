"""Batch encoder, vectorized numpy definition (the ``backend="torch"`` fallback and test oracle).

For row ``b`` with user ``u = rows[b]`` and end ``e = ends[b]``, the window is the user's events at
positions ``p`` in ``[s, e)`` with ``s = max(0, e - L)`` (``n = e - s`` events), placed in the last
``n`` columns (``pad_left``) or the first ``n``; every output is 0 (``False``) at padding.

* ``items[b, j]``, ``timestamps[b, j]``: the event's item and time; ``mask[b, j]``: True.
* ``time_buckets[b, j]``: 0 if ``p == 0``, else ``min(NB - 1, bit_length(t[p] - t[p - 1]))``; the
  gap reaches back to the event before the window. Gaps are taken modulo 2**64 as unsigned, so a
  gap >= 2**63 (timestamps spanning more than the int64 range) still gets ``bit_length`` 64.
* ``targets[b, j]``: the user's item at ``p + 1``, 0 after the user's last event.
* ``negatives[b, j, k]`` (``K = num_negatives > 0``): at slots whose target ``T`` is nonzero, an item
  uniform on ``[1, V] \\ {T}``, from a counter-based generator (independent of threading)::

      splitmix64(x) = mix(x + 0x9E3779B97F4A7C15)      (one step of SplitMix64 from state x)
      mix(z)        = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                      z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)   (mod 2**64)
      seed_mix      = splitmix64(seed mod 2**64)
      h             = splitmix64(seed_mix + ((b * L + j) * K + k))        (mod 2**64)
      idx           = min(V - 2, int64(double(h >> 11) * 2**-53 * double(V - 1)))
      item          = idx + 1;  item += (item >= T)

  The product ``double(h >> 11) * 2**-53`` is exact, and one IEEE multiply by ``double(V - 1)``
  follows, so numpy and C++ agree bit for bit. Slots with target 0 hold 0.

Only the events a row reads are checked: items at positions ``[s, min(e + 1, len))`` must lie in
``[1, V]`` and timestamps must not decrease over the pairs ``(p - 1, p)``, ``p`` in
``[max(s, 1), e)``. The error names the smallest offending global index (item errors first), with
the same message as the C++ encoder. The O(U + B) argument checks live in ``spnn_fast.encode``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from spnn_fast.reference.time_bucket import bit_length_np

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


def negatives_ref(targets: np.ndarray, num_items: int, num_negatives: int, seed: int) -> np.ndarray:
    """Negatives ``[B, L, K]`` for int64 ``targets [B, L]`` (see the module docstring)."""
    bsz, length = targets.shape
    k = num_negatives
    out = np.zeros((bsz, length, k), dtype=np.int64)
    slots = np.flatnonzero(targets.reshape(-1))
    if len(slots) == 0:
        return out
    counters = slots.astype(np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
    counters += np.uint64(mix_seed(seed))
    h = splitmix64_np(counters)
    h >>= np.uint64(11)
    u = h.astype(np.float64)
    u *= 2.0**-53
    u *= float(num_items - 1)
    idx = u.astype(np.int64)
    np.minimum(idx, num_items - 2, out=idx)
    idx += 1
    idx += idx >= targets.reshape(-1)[slots][:, None]
    out.reshape(-1, k)[slots] = idx
    return out


def _first_bad(global_idx: np.ndarray, bad: np.ndarray) -> Optional[int]:
    if not bad.any():
        return None
    return int(global_idx[bad].min())


def encode_batch_ref(
    offsets: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    rows: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    num_items: int,
    num_time_buckets: int,
    num_negatives: int,
    seed: int,
    pad_left: bool,
) -> Tuple[np.ndarray, ...]:
    """The encoder on validated 1-D int64 arrays; returns numpy ``(items, timestamps,
    time_buckets, mask, targets, negatives or None)``.

    ``rows``/``ends`` must already satisfy ``0 <= rows < U`` and ``1 <= ends <= len(user)``
    (``spnn_fast.encode.encode_batch`` checks them); items and timestamps read are checked here.
    """
    length = int(max_len)
    bsz = len(rows)
    start_user = offsets[rows]
    len_user = offsets[rows + 1] - start_user
    s = np.maximum(ends - length, 0)
    n = ends - s
    cols = np.arange(length, dtype=np.int64)
    # p: the user position shown in column j (outside [s, e) at padding, masked below).
    if pad_left:
        pos = (s - (length - n))[:, None] + cols
    else:
        pos = s[:, None] + cols
    mask = (pos >= s[:, None]) & (pos < ends[:, None])
    gidx = np.where(mask, start_user[:, None] + pos, 0)

    out_items = np.take(items, gidx) if bsz else np.zeros((0, length), np.int64)
    out_items[~mask] = 0
    out_ts = np.take(timestamps, gidx) if bsz else np.zeros((0, length), np.int64)
    out_ts[~mask] = 0

    has_next = mask & (pos + 1 < len_user[:, None])
    tidx = np.where(has_next, gidx + 1, 0)
    targets = np.take(items, tidx) if bsz else np.zeros((0, length), np.int64)
    targets[~has_next] = 0

    has_prev = mask & (pos > 0)
    pidx = np.where(has_prev, gidx - 1, 0)
    prev_ts = np.take(timestamps, pidx) if bsz else np.zeros((0, length), np.int64)

    bad_item = _first_bad(gidx, mask & ((out_items < 1) | (out_items > num_items)))
    bad_target = _first_bad(tidx, has_next & ((targets < 1) | (targets > num_items)))
    bad = [i for i in (bad_item, bad_target) if i is not None]
    if bad:
        i = min(bad)
        raise ValueError(f"items[{i}]={int(items[i])} is outside [1, {num_items}]")
    i = _first_bad(gidx, has_prev & (out_ts < prev_ts))
    if i is not None:
        raise ValueError(
            f"timestamps decrease within a user at index {i}: "
            f"{int(timestamps[i])} < {int(timestamps[i - 1])}"
        )

    # Non-decreasing pairs give a true gap in [0, 2**64): unsigned arithmetic keeps it exact.
    gaps = out_ts.view(np.uint64) - prev_ts.view(np.uint64)
    buckets = np.zeros((bsz, length), dtype=np.int64)
    small = gaps < np.uint64(1 << 63)
    buckets[small] = bit_length_np(gaps[small].view(np.int64))
    buckets[~small] = 64
    np.minimum(buckets, num_time_buckets - 1, out=buckets)
    buckets[~has_prev] = 0

    negatives = None
    if num_negatives > 0:
        negatives = negatives_ref(targets, num_items, num_negatives, seed)
    return out_items, out_ts, buckets, mask, targets, negatives


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
