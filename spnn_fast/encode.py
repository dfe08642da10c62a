"""``encode_batch``: windows of a CSR interaction log -> a padded :class:`SequenceBatch`.

Two backends give bit-identical outputs, negatives included: ``"cpp"`` (``spnn_fast._C``,
multi-threaded, GIL released, outputs handed to torch without a copy) and ``"torch"`` (the
vectorized numpy definition in :mod:`spnn_fast.reference.encode`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from spnn_fast import _ext, backends
from spnn_fast._checks import check_int
from spnn_fast.reference.encode import encode_batch_ref

__all__ = [
    "IGNORE_INDEX",
    "SequenceBatch",
    "default_num_threads",
    "encode_batch",
    "release_cached_buffers",
]

# The target of a position that has none (padding included): PyTorch's ``ignore_index`` default,
# so ``linear_cross_entropy(hidden, item_emb.weight, batch.targets)`` never trains on one.
IGNORE_INDEX = -100

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[int]]

# Below this many output slots per thread, extra threads cost more to start than they save
# (only used when num_threads is left to its default).
_SLOTS_PER_THREAD = 16384


@dataclasses.dataclass
class SequenceBatch:
    """A padded batch of ``B`` windows of length ``L`` (CPU tensors unless moved with ``to``).

    ``items``, ``timestamps``, ``time_buckets``, ``targets``: int64 ``[B, L]``; ``mask``: bool
    ``[B, L]``, True at events; ``negatives``: int64 ``[B, L, K]`` or None when ``K = 0``;
    ``users``: int64 ``[B]``, the user row (in the log) of each window, or None.

    ``targets`` holds the next item id (``1..V``) where a position has a target and
    ``ignore_index`` (default :data:`IGNORE_INDEX` = -100, PyTorch's) everywhere else, padding
    included: the package's losses and PyTorch's take it as it is, with their default
    ``ignore_index``, and an item table whose row ``i`` is item ``i`` (row 0 the padding, as in
    ``nn.Embedding(V + 1, d, padding_idx=0)``). ``targets > 0`` selects the positions with one.
    """

    items: torch.Tensor
    timestamps: torch.Tensor
    time_buckets: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    negatives: Optional[torch.Tensor] = None
    users: Optional[torch.Tensor] = None
    ignore_index: int = IGNORE_INDEX

    def _map(self, fn, per_row=None) -> SequenceBatch:
        """Every tensor through ``fn`` (``users``, one value per row, through ``per_row``)."""
        out = {"ignore_index": self.ignore_index}
        for f in dataclasses.fields(self):
            if f.name == "ignore_index":
                continue
            t = getattr(self, f.name)
            g = per_row if f.name == "users" and per_row is not None else fn
            out[f.name] = None if t is None else g(t)
        return SequenceBatch(**out)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> SequenceBatch:
        """Every tensor moved to ``device`` (``non_blocking`` as in ``Tensor.to``)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SequenceBatch:
        """Every tensor in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def tail(self, n: int) -> SequenceBatch:
        """The last ``n >= 1`` columns (all of them when ``n >= L``): with left padding, each
        window's ``n`` newest events."""
        n = check_int("n", n, 1, " (tail keeps the last n columns)")
        if n >= self.max_len:
            return self
        return self._map(lambda t: t[:, -n:], per_row=lambda t: t)

    def cut(self, keep: Union[int, ArrayLike]) -> SequenceBatch:
        """Each row ``b`` with only its last ``keep[b]`` columns (a left-padded window cut to its
        ``keep[b]`` newest events: a cold-start input); the other columns become padding
        (``targets`` there become ``ignore_index``). ``keep``: an int for every row, or ``[B]``
        integers (a tensor, a numpy array, a list), each ``>= 0``; ``keep[b] >= L`` keeps the
        whole row."""
        keep = self._keep(keep)
        cols = torch.arange(self.max_len, device=self.items.device)
        visible = cols.unsqueeze(0) >= (self.max_len - keep).unsqueeze(1)

        def hide(t: torch.Tensor) -> torch.Tensor:
            if t is self.targets:
                return t.masked_fill(~visible, self.ignore_index)
            if t.dtype == torch.bool:
                return t & visible
            return t * (visible if t.dim() == 2 else visible.unsqueeze(-1))

        return self._map(hide, per_row=lambda t: t)

    def _keep(self, keep: Union[int, ArrayLike]) -> torch.Tensor:
        """``keep`` checked, as int64 ``[B]`` on the batch's device."""
        if isinstance(keep, bool):
            raise TypeError("keep must be an int or [B] integers, got bool")
        if isinstance(keep, torch.Tensor) and keep.dim() == 0 and not keep.is_floating_point():
            keep = int(keep)  # one int for every row, as a 0-dim tensor
        if isinstance(keep, (int, np.integer)):
            keep = torch.full((self.batch_size,), int(keep), dtype=torch.int64)
        elif isinstance(keep, torch.Tensor):
            if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
                raise TypeError(f"keep must hold integers, got dtype {keep.dtype}")
        else:
            keep = torch.from_numpy(_as_int64("keep", keep))
        if keep.dim() != 1 or keep.shape[0] != self.batch_size:
            raise ValueError(
                f"keep must be an int or [B={self.batch_size}] integers (one per row), got shape "
                f"{tuple(keep.shape)}"
            )
        neg = torch.nonzero(keep < 0)
        if len(neg):
            b = int(neg[0, 0])
            raise ValueError(
                f"keep must be >= 0 (events kept per row), got keep[{b}]={int(keep[b])}"
            )
        return keep.to(device=self.items.device, dtype=torch.int64)

    @property
    def batch_size(self) -> int:
        return self.items.shape[0]

    @property
    def max_len(self) -> int:
        return self.items.shape[1]


def default_num_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def release_cached_buffers() -> int:
    """Free the output blocks the C++ encoder keeps for reuse; returns the bytes freed.

    Blocks come back to a small cache (at most 4 blocks, 1 GiB) when the last tensor of a batch
    dies, so that the next batch of the same shape writes into memory that is already mapped.
    """
    return 0 if _ext.C is None else int(_ext.C.release_cached_buffers())


def _as_int64(name: str, x: ArrayLike) -> np.ndarray:
    """A 1-D C-contiguous int64 view of ``x`` (copied only when its dtype or layout differ)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {x.device}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
        x = x.detach().numpy()
    elif not isinstance(x, np.ndarray):
        try:  # a list, a tuple, a range, or any other array-like of integers
            x = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array-like of integers ({e})") from None
        if x.size == 0:  # np.asarray([]) is float64
            x = x.astype(np.int64)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.dtype == np.uint64 and len(x) and x.max() >= 2**63:  # would wrap to negative int64
        i = int(np.argmax(x >= 2**63))
        raise ValueError(f"{name}[{i}]={int(x[i])} does not fit int64")
    # np.ascontiguousarray would also do, but returns a base-class view of an np.memmap; keeping
    # the object as it is makes "no copy" easy to see.
    if x.dtype == np.int64 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=np.int64)


def _check_log(offsets: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> None:
    if len(offsets) < 1:
        raise ValueError("offsets must have at least one entry (U + 1 for U users), got 0")
    if offsets[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    bad = np.flatnonzero(offsets[1:] < offsets[:-1])
    if len(bad):
        i = int(bad[0]) + 1
        raise ValueError(
            f"offsets decrease at index {i}: {int(offsets[i])} < {int(offsets[i - 1])}"
        )
    if offsets[-1] != len(items):
        raise ValueError(f"offsets[-1]={int(offsets[-1])} must equal len(items)={len(items)}")
    if len(timestamps) != len(items):
        raise ValueError(f"timestamps has {len(timestamps)} entries, items has {len(items)}")


def _check_rows(
    offsets: np.ndarray, rows: np.ndarray, ends: np.ndarray, target_ends: np.ndarray
) -> None:
    if len(rows) != len(ends):
        raise ValueError(f"rows and ends must have equal lengths, got {len(rows)} and {len(ends)}")
    if len(target_ends) != len(rows):
        raise ValueError(
            f"target_ends must have one entry per row, got {len(target_ends)} for {len(rows)}"
        )
    num_users = len(offsets) - 1
    bad = np.flatnonzero((rows < 0) | (rows >= num_users))
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"rows[{b}]={int(rows[b])} is outside [0, {num_users})")
    lengths = offsets[rows + 1] - offsets[rows]
    bad = np.flatnonzero((ends < 1) | (ends > lengths))
    if len(bad):
        b = int(bad[0])
        raise ValueError(
            f"ends[{b}]={int(ends[b])} is outside [1, {int(lengths[b])}] "
            f"(the length of user {int(rows[b])} at rows[{b}])"
        )
    bad = np.flatnonzero((target_ends < 0) | (target_ends > lengths))
    if len(bad):
        b = int(bad[0])
        raise ValueError(
            f"target_ends[{b}]={int(target_ends[b])} is outside [0, {int(lengths[b])}] "
            f"(the length of user {int(rows[b])} at rows[{b}])"
        )


def encode_batch(
    offsets: ArrayLike,
    items: ArrayLike,
    timestamps: ArrayLike,
    rows: ArrayLike,
    ends: ArrayLike,
    max_len: int,
    *,
    num_items: int,
    target_ends: Optional[ArrayLike] = None,
    num_time_buckets: int = 32,
    num_negatives: int = 0,
    seed: int = 0,
    pad_side: str = "left",
    num_threads: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    backend: Optional[str] = None,
) -> SequenceBatch:
    """Encode ``B`` windows of a CSR interaction log into padded ``[B, L]`` tensors.

    Args:
        offsets: int ``[U + 1]``, ``offsets[0] = 0``, non-decreasing, ``offsets[U] = len(items)``;
            user ``u``'s events are positions ``offsets[u]:offsets[u + 1]``.
        items: int ``[N]``, item ids in ``[1, num_items]``.
        timestamps: int ``[N]`` seconds, non-decreasing within each user.
        rows: int ``[B]``, the user of each row, in ``[0, U)``.
        ends: int ``[B]``, ``1 <= ends[b] <= len(user rows[b])``: the row's window is the user's
            events at positions ``[max(0, e - L), e)``.
        max_len: ``L >= 1``.
        num_items: ``V``; items are ``1..V`` (0 is padding). ``V >= 2`` when sampling negatives.
        target_ends: int ``[B]`` in ``[0, len(user)]``: a position's target is the user's next
            event only if that event's position is below ``target_ends[b]``. Default ``ends``:
            the last position of every window has target 0, and no batch reads an event at or
            past ``ends`` (the event after a training window may be a held-out one). Pass
            ``ends + 1`` (clipped to the user's length) for the next event as the last target.
        num_time_buckets: ``NB >= 1``; ``time_buckets`` lie in ``[0, NB)``.
        num_negatives: ``K >= 0`` negatives per position with a nonzero target.
        seed: any int (taken mod 2**64); the same inputs and seed give the same negatives with any
            thread count and either backend.
        pad_side: ``"left"`` (events fill the last columns) or ``"right"``.
        num_threads: C++ worker threads; default: the CPUs this process may use (fewer for small
            batches). Outputs do not depend on it.
        ignore_index: the target of a position without one; any int that is not an item id
            (not in ``[1, V]``). Default -100, PyTorch's, which its losses and the package's skip.
        backend: ``"cpp"``, ``"torch"``, ``"auto"`` or None (``SPNN_FAST_BACKEND``, else auto).

    Array inputs are numpy arrays (``np.memmap`` included, read in place), CPU tensors or any
    array-like of integers (a list, a tuple); other integer dtypes and non-contiguous arrays are
    converted to contiguous int64.

    Returns:
        :class:`SequenceBatch` with, for the event at user position ``p`` in column ``j``:
        ``items [B, L]``, ``timestamps [B, L]``, ``mask [B, L]`` (True at events),
        ``time_buckets [B, L]`` = 0 if ``p == 0`` else
        ``min(NB - 1, bit_length(t[p] - t[p - 1]))`` (the gap may reach before the window),
        ``targets [B, L]`` = the user's item at ``p + 1`` if ``p + 1 < target_ends[b]``, else
        ``ignore_index``, and
        ``negatives [B, L, K]`` (None when ``K = 0``): items uniform on ``[1, V]`` without the
        target, at positions with a target. All are 0 at padding (``targets``: ``ignore_index``;
        ``mask``: False). The sampling formula
        is in :mod:`spnn_fast.reference.encode`. ``users [B]`` is a copy of ``rows``.

    Raises:
        TypeError: a non-integer array or argument. ValueError: a bad argument, naming it, the
        first offending index and its value. The offsets, ``rows`` and ``ends`` are checked in
        O(U + B); items and timestamps only where this call reads them (the window and its
        targets), so a bad event elsewhere goes unnoticed: ``InteractionLog.validate()``
        checks a whole log once.
    """
    max_len = check_int("max_len", max_len, 1)
    num_time_buckets = check_int("num_time_buckets", num_time_buckets, 1)
    num_negatives = check_int("num_negatives", num_negatives, 0)
    num_items = check_int(
        "num_items",
        num_items,
        2 if num_negatives > 0 else 1,
        f" to sample negatives (num_negatives={num_negatives})" if num_negatives > 0 else "",
    )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed) & ((1 << 64) - 1)
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if 1 <= ignore_index <= num_items or not -(2**63) <= ignore_index < 2**63:
        raise ValueError(
            f"ignore_index must be an int64 that is not an item id in [1, {num_items}], got "
            f"{ignore_index}"
        )
    threads_given = num_threads is not None
    if threads_given:
        num_threads = check_int("num_threads", num_threads, 1)

    offsets = _as_int64("offsets", offsets)
    items = _as_int64("items", items)
    timestamps = _as_int64("timestamps", timestamps)
    rows = _as_int64("rows", rows)
    ends = _as_int64("ends", ends)
    target_ends = ends if target_ends is None else _as_int64("target_ends", target_ends)
    _check_log(offsets, items, timestamps)
    _check_rows(offsets, rows, ends, target_ends)

    name = backends.select("encode_batch", backend, ("cpp", "torch"), "cpu")
    args = (offsets, items, timestamps, rows, ends, target_ends, max_len, num_items,
            num_time_buckets)  # fmt: skip
    if name == "cpp":
        if not threads_given:
            slots = len(rows) * max_len * (1 + num_negatives)
            num_threads = max(1, min(default_num_threads(), slots // _SLOTS_PER_THREAD))
        out = _ext.C.encode_batch(
            *args, num_negatives, seed, pad_side == "left", num_threads, ignore_index
        )
    else:
        out = encode_batch_ref(*args, num_negatives, seed, pad_side == "left", ignore_index)
    fields = (None if a is None else torch.from_numpy(a) for a in out)
    return SequenceBatch(*fields, users=torch.from_numpy(rows.copy()), ignore_index=ignore_index)
