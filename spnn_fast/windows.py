"""Training windows and their targets, under the leave-one-out protocol (:mod:`spnn_fast.protocol`).

Each user's training events ``[0, n-2)`` are cut into windows of ``max_len`` that end at
``n-2, n-2-S, n-2-2S, ...`` (stride ``S``; ``S = max_len``: windows that do not overlap). Every
position of a window is trained on the next event, except a target that would be the validation
event (position ``n-2``) and, with overlapping windows, a target that an older window also holds
(:func:`fresh_targets`): each training target is trained once per epoch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from spnn_fast.encode import IGNORE_INDEX, SequenceBatch, encode_batch
from spnn_fast.protocol import train_ends

__all__ = ["fresh_targets", "make_batch", "training_windows"]


def training_windows(
    log, max_len: int, stride: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, ends) of the training windows over each user's events ``[0, n-2)``: windows of
    ``max_len`` ending at ``n-2, n-2-S, n-2-2S, ...`` until one starts at the first event, with
    stride ``S = stride or max_len`` (``S < max_len``: overlapping windows; :func:`fresh_targets`
    keeps each target in one of them, after a long context). Windows without a trainable target
    are left out."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride} must be in [1, max_len={max_len}]")
    t_end = train_ends(log)
    counts = 1 + -(-np.maximum(t_end - max_len, 0) // stride)  # 1 + ceil(max(T - L, 0) / S)
    rows = np.repeat(np.arange(len(t_end), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(len(rows), dtype=np.int64) - np.repeat(first, counts)
    ends = t_end[rows] - k * stride
    # Left out: a newest window whose only target would be the validation event: one that holds a
    # single event, or, at stride 1, one whose other targets older windows hold (fresh_targets).
    newest = ends == t_end[rows]
    keep = ~(newest & ((ends == 1) | ((stride == 1) & (ends > max_len))))
    return rows[keep], ends[keep]


def fresh_targets(
    targets: Tensor,
    ends: np.ndarray,
    max_len: int,
    stride: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``targets`` of windows from :func:`training_windows` ``(max_len, stride)`` with every
    target that an older window also holds set to ``ignore_index``, so each target is trained
    once per epoch.

    With overlapping windows (``stride S < max_len``) the window ending at ``e`` shares its first
    ``max_len - S`` events with the window ending at ``e - S``, which holds them later, after a
    longer context; a window that starts at the user's first event (``e <= max_len``) has no older
    window and keeps all its targets. So every kept target has at least ``max_len - S`` earlier
    events in its window, or all the events the user has before it. (The Trainer applies this
    before a cold-start cut, which then keeps only the targets among a window's last k events.)
    ``targets`` may have more columns than ``max_len``; its last columns are the windows'
    newest."""
    stride = stride or max_len
    if stride >= max_len:
        return targets
    older = torch.from_numpy(np.asarray(ends) > max_len).to(targets.device)
    cols = torch.arange(targets.shape[1], device=targets.device)
    covered = older.unsqueeze(1) & (cols < targets.shape[1] - stride).unsqueeze(0)
    return targets.masked_fill(covered, ignore_index)


def make_batch(
    log,
    rows: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    num_time_buckets: int,
    train_end: Optional[np.ndarray] = None,
) -> SequenceBatch:
    """Encode windows with the targets that lie inside the training events: each position's next
    event, up to the user's training end ``n-2`` (the validation event is never a target).

    ``train_end``: :func:`~spnn_fast.protocol.train_ends` of ``log`` (computed here if None;
    callers that build many batches pass it once).
    """
    train_end = train_ends(log) if train_end is None else train_end
    return encode_batch(
        log.offsets, log.items, log.timestamps, rows, ends, max_len,
        num_items=log.num_items, num_time_buckets=num_time_buckets,
        target_ends=np.minimum(np.asarray(ends) + 1, train_end[rows]),
    )  # fmt: skip
