"""Full-ranking metrics: the rank of each target among all items, then HR@K, NDCG@K and MRR@K.

Scores are ``[M, V + 1]`` with column 0 the padding id, which is never ranked. The rank of the
target ``t`` of a row is

    rank = 1 + #{v in 1..V, v != t : s_v >= s_t}

so ties count against the target (a constant scorer gets rank V, never 1), as a strict
evaluation should. Per row, with rank r:

    HR@K   = 1 if r <= K else 0
    NDCG@K = 1 / log2(r + 1) if r <= K else 0     (one relevant item: IDCG = 1)
    MRR@K  = 1 / r if r <= K else 0

and each metric is the mean over rows. :class:`MetricAccumulator` keeps running sums, sums of
squares and the row count in one float64 tensor so that shards can be summed with ``all_reduce``;
the squares give each mean's standard error over rows (how much the figure would move on another
draw of users of the same size).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["DEFAULT_KS", "MetricAccumulator", "rank_metrics", "ranks_from_scores"]

DEFAULT_KS = (5, 10, 20)
_METRICS = ("HR", "NDCG", "MRR")
# Rows compared at once inside ranks_from_scores: bounds the [rows, V] bool temporary.
_CHUNK_ELEMENTS = 1 << 26

TensorLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


def ranks_from_scores(scores: torch.Tensor, targets: TensorLike) -> torch.Tensor:
    """1-based rank of each target among the items 1..V (ties count against the target).

    Args:
        scores: float ``[M, V + 1]``; column 0 (padding) is ignored. NaN in columns 1..V raises.
        targets: int ``[M]`` in ``1..V``.

    Returns:
        int64 ``[M]`` on the device of ``scores``, values in ``1..V``.

    Call it chunk by chunk of rows for large evaluations; internally rows are compared in
    blocks so that the temporary stays under ~64M booleans.
    """
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must be [M, V + 1] with V >= 1 (column 0 = padding), got shape "
            f"{tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    targets = torch.as_tensor(targets, device=scores.device)
    if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must be [M] with M = scores.shape[0] = {scores.shape[0]}, got shape "
            f"{tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be integer item ids, got dtype {targets.dtype}")
    m, v = scores.shape[0], scores.shape[1] - 1
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    targets = targets.long()
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 1 or hi > v:
        raise ValueError(
            f"targets must lie in [1, V] = [1, {v}] (0 is padding), got values in [{lo}, {hi}]"
        )
    items = scores[:, 1:]
    if bool(torch.isnan(items).any()):
        row = int(torch.isnan(items).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"scores hold NaN (first in row {row}); cannot rank")
    target_scores = scores.gather(1, targets[:, None])
    step = max(1, _CHUNK_ELEMENTS // v)
    # The target's own column satisfies s_t >= s_t, which supplies the "1 +" of the rank.
    parts = [
        (items[i : i + step] >= target_scores[i : i + step]).sum(dim=1) for i in range(0, m, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_ks(ks: Sequence[int]) -> tuple:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got ks={ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks holds duplicates: {ks}")
    return tuple(int(k) for k in ks)


class MetricAccumulator:
    """Running sums of HR@K, NDCG@K and MRR@K over batches of ranks.

    ``state()`` is one float64 tensor ``[6 * len(ks) + 1]``: the sums in the order of
    :attr:`keys` (HR@k for every k, then NDCG@k, then MRR@k), the sums of squares in the same
    order, and the row count last. To gather
    shards: ``s = acc.state(); torch.distributed.all_reduce(s); acc.load_state(s)``. The state
    lives on ``device``; with ``device=None`` it moves to the device of the first ranks added
    (so it sits on the GPU, ready for NCCL).
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, device: Optional[torch.device] = None):
        self.ks = _check_ks(ks)
        self.keys = tuple(f"{name}@{k}" for name in _METRICS for k in self.ks)
        self._follow = device is None
        self._state = torch.zeros(2 * len(self.keys) + 1, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self._state.zero_()

    @property
    def count(self) -> int:
        return int(self._state[-1])

    def add(self, ranks: TensorLike) -> None:
        """Add a batch of 1-based ranks (int ``[M]``, any device)."""
        ranks = torch.as_tensor(ranks)
        if ranks.ndim != 1:
            raise ValueError(f"ranks must be 1-D, got shape {tuple(ranks.shape)}")
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.is_complex():
            raise TypeError(f"ranks must be integers, got dtype {ranks.dtype}")
        if ranks.numel() == 0:
            return
        if int(ranks.min()) < 1:
            raise ValueError(f"ranks are 1-based, got a rank of {int(ranks.min())}")
        if self._follow:
            self._state = self._state.to(ranks.device)
            self._follow = False
        r = ranks.to(torch.float64)[:, None]
        ks = torch.tensor(self.ks, dtype=torch.float64, device=r.device)[None, :]
        hit = (r <= ks).to(torch.float64)
        per_row = torch.cat([hit, hit / torch.log2(r + 1.0), hit / r], dim=1)  # [M, 3 * len(ks)]
        sums = torch.cat(
            [
                per_row.sum(0),
                per_row.square().sum(0),
                torch.tensor([float(ranks.numel())], dtype=torch.float64, device=r.device),
            ]
        )
        self._state += sums.to(self._state.device)

    def state(self) -> torch.Tensor:
        """A copy of the float64 state ``[6 * len(ks) + 1]`` (sums, squares, the row count)."""
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the state (e.g. with the all-reduced sum of every rank's state)."""
        state = torch.as_tensor(state)
        if tuple(state.shape) != tuple(self._state.shape):
            raise ValueError(
                f"state must have shape {tuple(self._state.shape)} for ks={self.ks}, got "
                f"{tuple(state.shape)}"
            )
        self._state = state.to(dtype=torch.float64, device=self._state.device).clone()

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add ``other``'s sums into this one (same ks); returns self."""
        if not isinstance(other, MetricAccumulator) or other.ks != self.ks:
            raise ValueError(
                f"can only merge a MetricAccumulator with ks={self.ks}, got "
                f"{getattr(other, 'ks', type(other).__name__)}"
            )
        self._state += other._state.to(self._state.device)
        return self

    def compute(self) -> Dict[str, float]:
        """Means over all rows added: ``{"HR@5": ..., "NDCG@5": ..., "MRR@5": ..., ...}``."""
        values, n = self._values()
        return {key: values[i] / n for i, key in enumerate(self.keys)}

    def standard_errors(self) -> Dict[str, float]:
        """Standard error over rows of each mean in :meth:`compute`: ``sd / sqrt(n)`` with the
        sample standard deviation ``sd`` of the per-row values (0.0 for a single row)."""
        values, n = self._values()
        m = len(self.keys)
        out = {}
        for i, key in enumerate(self.keys):
            mean = values[i] / n
            var = max(values[m + i] / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else 0.0
            out[key] = math.sqrt(var / n)
        return out

    def _values(self):
        values = self._state.cpu().tolist()
        n = values[-1]
        if n == 0:
            raise ValueError("no ranks were added; metrics of zero rows are undefined")
        return values, n


def rank_metrics(ranks: TensorLike, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """HR@K, NDCG@K and MRR@K (means over rows) of 1-based ranks ``[M]``, for K in ``ks``."""
    acc = MetricAccumulator(ks)
    acc.add(ranks)
    return acc.compute()
