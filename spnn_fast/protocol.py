"""Leave-one-out evaluation, as RecBole evaluates sequential models, plus cold-start splits.

Each user's events are in time order (an :class:`~spnn_fast.log.InteractionLog`); for a user
with ``n >= 3`` events at positions ``0..n-1``:

==============  ==================================  ===============
split           events the model may see (input)    target
==============  ==================================  ===============
training        ``[0, t)`` for ``t`` in ``1..n-3``  event ``t``
``valid``       ``[0, n-2)``                        event ``n-2``
``test``        ``[0, n-1)``                        event ``n-1``
``cold@k``      ``[max(0, n-1-k), n-1)``            event ``n-1``
==============  ==================================  ===============

So training uses only the events ``[0, n-2)`` (:func:`train_ends` gives ``n-2``); the validation
input holds neither the validation target nor the test event; the test input holds the
validation event (as in RecBole: it is history by then) but never the test target; ``cold@k``
has the same targets as ``test`` and keeps only the k most recent events of the test input. The
target event (its item and its timestamp) is never part of the input. A model with a maximum
sequence length L reads the last L events of its input range.

An :class:`EvalSet` names each evaluation row by ``(rows[i], ends[i])``: user ``rows[i]``, input
events ``[starts[i], ends[i])`` in the user's own positions (``starts = max(0, ends -
max_history)``, or 0 when ``max_history`` is None), and target item ``targets[i]``, which is the
user's event at position ``ends[i]``. Ranking is over all items 1..V, history items included
(RecBole does not mask them for sequential models); see :mod:`spnn_fast.metrics`.

Comparing with RecBole 1.2.1: events with equal timestamps keep their file order in both (stable
sorts). RecBole, however, sorts by min-max-normalised float32 timestamps (``normalize_all`` is on
for ml-100k), which merges events about a second apart into ties that keep their file order, so
a few users' last events come in another order there (docs/experiments.md counts them on
ml-100k). RecBole also reads at most the 50 most recent events (``MAX_ITEM_LIST_LENGTH``); that
cut belongs to the model's maximum length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from spnn_fast.log import InteractionLog

__all__ = [
    "DEFAULT_SPLITS",
    "EvalSet",
    "Split",
    "eval_sets",
    "leave_one_out",
    "train_ends",
    "train_log",
    "train_samples",
]

MIN_EVENTS = 3
DEFAULT_SPLITS = ("valid", "test", "cold@3", "cold@5", "cold@10")
_COLD = re.compile(r"cold@([0-9]+)\Z")


@dataclass(frozen=True)
class EvalSet:
    """Evaluation rows: user ``rows[i]`` sees its events ``[starts[i], ends[i])`` and must rank
    item ``targets[i]`` (its event at position ``ends[i]``).

    Fields (int64 arrays of one length M):
        rows: user index in the log, ``0..U-1``.
        ends: end (exclusive) of the visible events, in the user's own positions.
        targets: target item ids in ``1..V``.
        max_history: None to see all events before ``ends``; k to see only the k most recent.
    """

    rows: np.ndarray
    ends: np.ndarray
    targets: np.ndarray
    max_history: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("rows", "ends", "targets"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.int64:
                raise TypeError(f"EvalSet.{name} must be a 1-D int64 numpy array")
        if not len(self.rows) == len(self.ends) == len(self.targets):
            raise ValueError(
                f"EvalSet rows, ends and targets must have one length, got {len(self.rows)}, "
                f"{len(self.ends)} and {len(self.targets)}"
            )
        k = self.max_history
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"EvalSet.max_history must be None or an int >= 1, got {k!r}")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def starts(self) -> np.ndarray:
        """First visible position of each row: ``max(0, ends - max_history)`` (or 0)."""
        if self.max_history is None:
            return np.zeros_like(self.ends)
        return np.maximum(self.ends - self.max_history, 0)


@dataclass(frozen=True)
class Split:
    """Leave-one-out split of a log.

    Fields:
        train_ends: int64 ``[U]``, ``n_u - 2``: training uses each user's events ``[0, n_u-2)``.
        valid: :class:`EvalSet` with ends ``n_u - 2`` (target: the second-last event).
        test: :class:`EvalSet` with ends ``n_u - 1`` (target: the last event).
    """

    train_ends: np.ndarray
    valid: EvalSet
    test: EvalSet


def _lengths(log: InteractionLog) -> np.ndarray:
    if not isinstance(log, InteractionLog):
        raise TypeError(f"log must be an InteractionLog, got {type(log).__name__}")
    lengths = np.asarray(log.lengths, dtype=np.int64)
    short = np.flatnonzero(lengths < MIN_EVENTS)
    if len(short):
        u = int(short[0])
        raise ValueError(
            f"leave-one-out needs >= {MIN_EVENTS} events per user; {len(short)} users have "
            f"fewer (first: user {u}, raw id {log.user_ids[u].tolist()!r}, {int(lengths[u])} events). "
            f"Drop them first, e.g. spnn_fast.data.load(..., min_events={MIN_EVENTS})"
        )
    return lengths


def _at(log: InteractionLog, max_history: Optional[int], back: int) -> EvalSet:
    """Rows whose target is each user's event ``n - back``."""
    lengths = _lengths(log)
    rows = np.arange(log.num_users, dtype=np.int64)
    ends = lengths - back
    targets = np.asarray(log.items[np.asarray(log.offsets[:-1]) + ends], dtype=np.int64)
    return EvalSet(rows, ends, targets, max_history)


def train_ends(log: InteractionLog) -> np.ndarray:
    """int64 ``[U]``: ``n_u - 2``, the end (exclusive) of each user's training events, in
    ``[1, n_u - 2]``; training targets are the events at positions ``1..n_u - 3``."""
    return _lengths(log) - 2


def train_log(log: InteractionLog) -> InteractionLog:
    """The log cut to each user's training events ``[0, n_u - 2)``, with the same item and user
    remapping (V and U unchanged, even for items seen only in validation or test)."""
    ends = train_ends(log)
    offsets = np.zeros(log.num_users + 1, dtype=np.int64)
    np.cumsum(ends, out=offsets[1:])
    starts = np.asarray(log.offsets[:-1], dtype=np.int64)
    index = np.repeat(starts - offsets[:-1], ends) + np.arange(offsets[-1], dtype=np.int64)
    return InteractionLog.from_csr(
        offsets,
        np.asarray(log.items[index]),
        np.asarray(log.timestamps[index]),
        log.user_ids,
        log.item_ids,
        validate=False,
    )


def train_samples(log: InteractionLog, max_history: Optional[int] = None) -> EvalSet:
    """Every training prefix as a row (RecBole's sequence augmentation): for each user, ends
    ``t`` in ``1..n_u - 3`` with target event ``t``, so no target lies outside ``[0, n_u-2)``.
    Users with 3 events contribute none."""
    counts = train_ends(log) - 1
    total = int(counts.sum())
    rows = np.repeat(np.arange(log.num_users, dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    ends = np.arange(total, dtype=np.int64) - first + 1
    starts = np.asarray(log.offsets[:-1], dtype=np.int64)
    targets = np.asarray(log.items[starts[rows] + ends], dtype=np.int64)
    return EvalSet(rows, ends, targets, max_history)


def leave_one_out(log: InteractionLog) -> Split:
    """Leave-one-out split: the last event of each user is the test target, the second-last the
    validation target, the rest trains. Every user needs >= 3 events."""
    return Split(train_ends(log), _at(log, None, 2), _at(log, None, 1))


def eval_sets(log: InteractionLog, splits: Sequence[str] = DEFAULT_SPLITS) -> Dict[str, EvalSet]:
    """Evaluation sets by name: ``"valid"``, ``"test"``, or ``"cold@k"`` for any k >= 1 (test
    targets, input cut to the k most recent events)."""
    if isinstance(splits, str):
        splits = (splits,)
    out: Dict[str, EvalSet] = {}
    for name in splits:
        match = _COLD.match(name) if isinstance(name, str) else None
        if name == "valid":
            out[name] = _at(log, None, 2)
        elif name == "test":
            out[name] = _at(log, None, 1)
        elif match and int(match.group(1)) >= 1:
            out[name] = _at(log, int(match.group(1)), 1)
        else:
            raise ValueError(
                f"unknown split {name!r}; valid names are 'valid', 'test' and 'cold@k' with an "
                f"integer k >= 1 (e.g. {', '.join(DEFAULT_SPLITS)})"
            )
    return out
