"""``spnn_fast::topk_scores`` and ``spnn_fast::target_rank``: top-k items and the target's rank
over an item catalogue, without the ``N x V`` score matrix.

``backend`` is ``"triton"`` (kernels/topk.py) or ``"torch"`` (the chunked path in
spnn_fast/reference/topk.py). Neither op has a gradient (indices and ranks are piecewise
constant); spnn_fast.functional calls them on detached inputs, after checking the values they
read (finite inputs, the exclusion lists, the targets' range): the ops only launch, without
waiting for the device.
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


@torch.library.custom_op("spnn_fast::topk_scores", mutates_args=())
def topk_scores(
    hidden: Tensor,
    items: Tensor,
    k: int,
    exclude_offsets: Optional[Tensor],
    exclude_ids: Optional[Tensor],
    padding_idx: Optional[int],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(values [N, k] in the dtype of ``hidden``, indices [N, k] int64); the row
    ``padding_idx`` (None: none) is never returned."""
    args = (hidden, items, k, exclude_offsets, exclude_ids)
    if backend == "triton":
        return _kernels().topk_fwd(*args, padding_idx=padding_idx)
    return _ref.topk_scores_chunked(*args, padding_idx=padding_idx)


@topk_scores.register_fake
def _(hidden, items, k, exclude_offsets, exclude_ids, padding_idx, backend):
    n = hidden.shape[0]
    return hidden.new_empty((n, k)), hidden.new_empty((n, k), dtype=torch.int64)


@torch.library.custom_op("spnn_fast::target_rank", mutates_args=())
def target_rank(
    hidden: Tensor, items: Tensor, target: Tensor, padding_idx: Optional[int], backend: str
) -> Tensor:
    """1-based ranks [N] int64 among every row of ``items`` but ``padding_idx``."""
    if backend == "triton":
        return _kernels().target_rank_fwd(hidden, items, target, padding_idx=padding_idx)
    return _ref.target_rank_chunked(hidden, items, target, padding_idx=padding_idx)


@target_rank.register_fake
def _(hidden, items, target, padding_idx, backend):
    return hidden.new_empty((hidden.shape[0],), dtype=torch.int64)
