"""``spnn_fast::topk_scores`` and ``spnn_fast::target_rank``: top-k items and the target's rank
over an item catalogue, without the ``N x V`` score matrix.

``backend`` is ``"triton"`` (kernels/topk.py) or ``"torch"`` (the chunked path in
spnn_fast/reference/topk.py). Neither op has a gradient (indices and ranks are piecewise
constant); spnn_fast.functional calls them on detached inputs. The checks that read tensor
values (finite inputs, the exclusion lists, the targets' range) run here, inside the op, so that
``torch.compile(fullgraph=True)`` traces the functional API without a data-dependent branch.
"""

# No ``from __future__ import annotations``: torch.library reads the annotations as types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference import topk as _ref

__all__ = ["target_rank", "topk_scores"]


def _kernels():
    from spnn_fast.kernels import topk  # lazy: Triton is imported on the first Triton call

    return topk


def _check_finite(hidden: Tensor, items: Tensor) -> None:
    for name, t in (("hidden", hidden), ("items", items)):
        # min and max propagate NaN and show infinities, in one pass without temporaries
        lo, hi = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            row = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"{name} holds NaN or infinite values (first in row {row}); scores would not rank"
            )


def _check_exclude(offsets: Tensor, ids: Tensor, v: int) -> None:
    if int(offsets[0]) != 0:
        raise ValueError(f"exclude offsets must start at 0, got {int(offsets[0])}")
    step = offsets.diff()
    if bool((step < 0).any()):
        row = int((step < 0).nonzero()[0, 0])
        raise ValueError(
            f"exclude offsets must be non-decreasing; offsets[{row + 1}] = "
            f"{int(offsets[row + 1])} < offsets[{row}] = {int(offsets[row])}"
        )
    if int(offsets[-1]) != ids.shape[0]:
        raise ValueError(
            f"exclude offsets must end at len(item_ids) = {ids.shape[0]}, got {int(offsets[-1])}"
        )
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 1 or hi > v:
            raise ValueError(
                f"exclude item_ids must lie in [1, V] = [1, {v}] (0 is padding), got values in "
                f"[{lo}, {hi}]"
            )


def _check_target(target: Tensor, v: int) -> None:
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 1 or hi > v:
            raise ValueError(
                f"target must lie in [1, V] = [1, {v}] (0 is padding), got values in [{lo}, {hi}]"
            )


@torch.library.custom_op("spnn_fast::topk_scores", mutates_args=())
def topk_scores(
    hidden: Tensor,
    items: Tensor,
    k: int,
    exclude_offsets: Optional[Tensor],
    exclude_ids: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(values [N, k] float32, indices [N, k] int64)."""
    v = items.shape[0] - 1
    _check_finite(hidden, items)
    if exclude_offsets is not None:
        _check_exclude(exclude_offsets, exclude_ids, v)
    args = (hidden, items, k, exclude_offsets, exclude_ids)
    if backend == "triton":
        return _kernels().topk_fwd(*args)
    return _ref.topk_scores_chunked(*args)


@topk_scores.register_fake
def _(hidden, items, k, exclude_offsets, exclude_ids, backend):
    n = hidden.shape[0]
    return (
        hidden.new_empty((n, k), dtype=torch.float32),
        hidden.new_empty((n, k), dtype=torch.int64),
    )


@torch.library.custom_op("spnn_fast::target_rank", mutates_args=())
def target_rank(hidden: Tensor, items: Tensor, target: Tensor, backend: str) -> Tensor:
    """1-based ranks [N] int64."""
    _check_finite(hidden, items)
    _check_target(target, items.shape[0] - 1)
    if backend == "triton":
        return _kernels().target_rank_fwd(hidden, items, target)
    return _ref.target_rank_chunked(hidden, items, target)


@target_rank.register_fake
def _(hidden, items, target, backend):
    return hidden.new_empty((hidden.shape[0],), dtype=torch.int64)
