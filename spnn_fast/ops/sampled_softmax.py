"""``spnn_fast::sampled_softmax_rows``: sampled cross-entropy + logit distillation over each
row's target and the shared negatives, per row, with its backward.

The forward returns the row losses [N] (0 at ignored rows), the three per-row log-sum-exps the
backward re-forms the candidates' probabilities from and, from the Triton kernels, the rows'
gradient dloss_n/d hidden_n [N, D] and the positive's share of dloss_n/d s_n0 [N] (both empty
from the torch path, which computes them in the backward). ``backend`` is ``"triton"``
(kernels/sampled_softmax.py) or ``"torch"`` (the chunked path in
spnn_fast/reference/sampled_softmax.py). Neither the teacher nor ``log_q`` gets a gradient.
"""

# No ``from __future__ import annotations``: torch.library reads the annotations as types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference import sampled_softmax as _ref
from spnn_fast.reference.distill import compute_dtype

__all__ = ["sampled_softmax_rows"]


def _kernels():
    from spnn_fast.kernels import sampled_softmax  # lazy: Triton is imported on the first call

    return sampled_softmax


@torch.library.custom_op("spnn_fast::sampled_softmax_rows", mutates_args=())
def sampled_softmax_rows(
    hidden: Tensor,
    items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Tensor,
    negatives: Tensor,
    log_q: Optional[Tensor],
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [N], lse_s [N], lse_sT [N], lse_tT [N], d_hidden_rows, d_positive) in the
    accumulation dtype; d_hidden_rows [N, D] and d_positive [N] from the Triton kernels, empty
    from the torch path. Values (targets, negatives, log_q) are checked by the caller
    (:mod:`spnn_fast.functional.sampled`): the op only launches, without waiting for the device."""
    args = (hidden, items, teacher_hidden, teacher_items, target, negatives, log_q)
    params = (temperature, alpha, remove_accidental_hits, ignore_index)
    if backend == "triton":
        return _kernels().sampled_softmax_fwd(*args, *params)
    rows = _ref.sampled_rows_chunked(*args, *params)
    empty = rows[0].new_empty((0,))
    return (*rows, empty, empty.clone())


@sampled_softmax_rows.register_fake
def _(hidden, items, teacher_hidden, teacher_items, target, negatives, log_q, temperature, alpha,
      remove_accidental_hits, ignore_index, backend):  # fmt: skip
    n = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype)
    triton = backend == "triton"
    rows = tuple(hidden.new_empty(n, dtype=cdt) for _ in range(4))
    d_rows = hidden.new_empty((n, hidden.shape[1]) if triton else (0,), dtype=cdt)
    return (*rows, d_rows, hidden.new_empty((n,) if triton else (0,), dtype=cdt))


@torch.library.custom_op("spnn_fast::sampled_softmax_rows_backward", mutates_args=())
def sampled_softmax_rows_backward(
    grad_rows: Tensor,
    hidden: Tensor,
    items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Tensor,
    negatives: Tensor,
    log_q: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_tt: Tensor,
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    backend: str,
    d_hidden_rows: Optional[Tensor] = None,
    d_positive: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(d_hidden [N, D], d_items [C, D]) for ``grad_rows`` [N] on the row losses; the Triton
    path takes the forward's ``d_hidden_rows`` and ``d_positive`` when given."""
    args = (grad_rows, hidden, items, teacher_hidden, teacher_items, target, negatives, log_q)
    stats = (lse_s, lse_st, lse_tt, temperature, alpha, remove_accidental_hits, ignore_index)
    if backend == "triton":
        grads = _kernels().sampled_softmax_bwd(
            *args, *stats, d_hidden_rows=d_hidden_rows, d_positive=d_positive
        )
    else:
        grads = _ref.sampled_rows_chunked_backward(*args, *stats)
    # contiguous whatever the inputs' strides, as the fake below says (a transposed table too)
    return tuple(g.contiguous() for g in grads)


@sampled_softmax_rows_backward.register_fake
def _(grad_rows, hidden, items, teacher_hidden, teacher_items, target, negatives, log_q, lse_s,
      lse_st, lse_tt, temperature, alpha, remove_accidental_hits, ignore_index, backend,
      d_hidden_rows=None, d_positive=None):  # fmt: skip
    return hidden.new_empty(hidden.shape), items.new_empty(items.shape)


def _setup_context(ctx, inputs, output):
    h, w, ht, wt, target, negatives, log_q, *params = inputs
    _, lse_s, lse_st, lse_tt, d_rows, d_pos = output
    ctx.mark_non_differentiable(lse_s, lse_st, lse_tt, d_rows, d_pos)
    ctx.save_for_backward(h, w, ht, wt, target, negatives, log_q, lse_s, lse_st, lse_tt, d_rows,
                          d_pos)  # fmt: skip
    ctx.params = tuple(params)  # temperature, alpha, remove_accidental_hits, ignore_index, backend


def _backward(ctx, grad_loss, *_stat_grads):
    h, w, ht, wt, target, negatives, log_q, lse_s, lse_st, lse_tt, d_rows, d_pos = ctx.saved_tensors
    temperature, alpha, remove_hits, ignore_index, backend = ctx.params
    d_h = d_w = None
    if grad_loss is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        given = d_rows.numel() > 0 or d_pos.numel() > 0
        d_h, d_w = sampled_softmax_rows_backward(
            grad_loss, h, w, ht, wt, target, negatives, log_q, lse_s, lse_st, lse_tt,
            temperature, alpha, remove_hits, ignore_index, backend,
            d_rows if given else None, d_pos if given else None,
        )  # fmt: skip
    # The teacher, the targets, the negatives and log_q never receive a gradient.
    return (d_h, d_w) + (None,) * 10


sampled_softmax_rows.register_autograd(_backward, setup_context=_setup_context)
