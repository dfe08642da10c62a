"""Cross-entropy over the catalogue with the forward's exponentials kept for the backward.

The chunked path (:mod:`spnn_fast.reference.distill`) keeps three numbers per row and forms the
logits again in the backward: four ``[N, V] x D`` products a step. Where the counted rows'
``[n, V]`` exponentials fit :data:`KEEP_BUDGET_BYTES`, the plain cross-entropy (no teacher) keeps
``exp(z - m)`` and the row sums from the forward instead, and the backward scales them into
``softmax(z) - onehot(y)``: three products, and no exp pass. Used by eager calls on the CPU
(:func:`spnn_fast.ops.distill.distill_rows_call`); the same losses and gradients as the chunked
path to float rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference.distill import (
    _safe_target,
    compute_dtype,
    counted_rows,
    pick_rows,
    scatter_rows,
)

__all__ = ["KEEP_BUDGET_BYTES", "ce_rows_kept", "ce_rows_kept_backward", "keeps_exponentials"]

# Bytes of [counted rows, V] exponentials a cross-entropy call may keep for its backward (ml-100k's
# teacher batch: about 3,000 rows x 1,682 items, 20 MB).
KEEP_BUDGET_BYTES = 64 * 2**20


def keeps_exponentials(hidden: Tensor, items: Tensor) -> bool:
    """Whether a cross-entropy over ``hidden [N, D]`` and ``items [V, D]`` keeps its exponentials:
    every row's fit the budget (the counted rows are not known before the call reads the
    targets)."""
    elem = torch.finfo(compute_dtype(hidden.dtype)).bits // 8
    return hidden.shape[0] * items.shape[0] * elem <= KEEP_BUDGET_BYTES


@torch.no_grad()
def ce_rows_kept(
    hidden: Tensor, items: Tensor, target: Tensor, ignore_index: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(loss [N] (0 at ignored rows), lse [N], e [n, V], sums [n], rows)``: ``e = exp(z - m)``
    and its row sums for the ``n`` counted rows (``rows``: their indices, None when every row
    counts), in the accumulation dtype."""
    n = hidden.shape[0]
    rows = counted_rows(target, ignore_index)
    h, y = (hidden, target) if rows is None else pick_rows(rows, hidden, target)
    cdt = compute_dtype(hidden.dtype)
    h, w = h.to(cdt), items.to(cdt)
    z = h @ w.T
    m = z.amax(dim=1)
    e = z.sub_(m[:, None]).exp_()
    sums = e.sum(dim=1)
    lse = m + sums.log()
    y = _safe_target(y, ignore_index)
    loss = lse - (h * w[y]).sum(dim=1)
    if rows is not None:
        loss, lse = scatter_rows(rows, n, loss, lse)
    return loss, lse, e, sums, rows


@torch.no_grad()
def ce_rows_kept_backward(
    grad_rows: Tensor,
    hidden: Tensor,
    items: Tensor,
    target: Tensor,
    ignore_index: int,
    e: Tensor,
    sums: Tensor,
    rows: Optional[Tensor],
    need_hidden: bool = True,
    need_items: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(d_hidden, d_items)`` (None where not needed) for ``grad_rows [N]`` on the row losses,
    from :func:`ce_rows_kept`'s exponentials (left unchanged: a second backward reads them
    again)."""
    cdt = e.dtype
    g, h, y = (
        (grad_rows, hidden, target) if rows is None else pick_rows(rows, grad_rows, hidden, target)
    )
    h, w, g = h.to(cdt), items.to(cdt), g.to(cdt)
    y = _safe_target(y, ignore_index)
    # d z = softmax(z) * g - onehot(y) * g, softmax(z) = e / sums: the row scale c = g / sums goes
    # on the [n, D] sides of the products, never over the [n, V] exponentials
    c = (g / sums)[:, None]
    d_hidden = d_items = None
    if need_hidden:
        d_h = (e @ w).mul_(c).sub_(g[:, None] * w[y])
        if rows is not None:
            d_h = scatter_rows(rows, hidden.shape[0], d_h)[0]
        d_hidden = d_h.to(hidden.dtype)
    if need_items:
        d_w = e.T @ (h * c)
        d_w.index_add_(0, y, g[:, None] * h, alpha=-1.0)
        d_items = d_w.to(items.dtype)
    return d_hidden, d_items
