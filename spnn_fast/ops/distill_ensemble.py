"""``spnn_fast::distill_rows_ensemble``: fused linear CE + logit distillation from the mean of M
teachers' temperature-softened distributions, per row, with its backward.

The forward returns the row losses [N] (0 at ignored rows) and the statistics the backward
recomputes the logits from: ``lse_s [N]``, ``lse_sT [N]`` and every teacher's ``lse_t [N, M]``.
There is one implementation, the chunked torch path of
spnn_fast/reference/distill_ensemble.py; the Triton kernels take one teacher (the "logits"
ensemble is one concatenated teacher and runs on ``spnn_fast::distill_rows``). The teachers get
no gradient.
"""

# No ``from __future__ import annotations``: torch.library reads the annotations as types.
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference import distill as _single
from spnn_fast.reference import distill_ensemble as _ref

__all__ = ["distill_rows_ensemble"]


@torch.library.custom_op("spnn_fast::distill_rows_ensemble", mutates_args=())
def distill_rows_ensemble(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: List[Tensor],
    teacher_items: List[Tensor],
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [N], lse_s [N], lse_sT [N], lse_t [N, M]) in the accumulation dtype. Targets are
    checked by the caller (:func:`spnn_fast.functional.distillation_loss`): the op never waits
    for the device."""
    return _ref.distill_rows_ensemble_chunked(
        student_hidden, student_items, teacher_hidden, teacher_items, target, temperature,
        alpha, ignore_index,
    )  # fmt: skip


@distill_rows_ensemble.register_fake
def _(student_hidden, student_items, teacher_hidden, teacher_items, target, temperature, alpha,
      ignore_index):  # fmt: skip
    n = student_hidden.shape[0]
    cdt = _single.compute_dtype(student_hidden.dtype)
    rows = tuple(student_hidden.new_empty(n, dtype=cdt) for _ in range(3))
    return (*rows, student_hidden.new_empty((n, len(teacher_hidden)), dtype=cdt))


@torch.library.custom_op("spnn_fast::distill_rows_ensemble_backward", mutates_args=())
def distill_rows_ensemble_backward(
    grad_rows: Tensor,
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: List[Tensor],
    teacher_items: List[Tensor],
    target: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_t: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> Tuple[Tensor, Tensor]:
    """(d_student_hidden, d_student_items) for ``grad_rows`` [N] on the row losses."""
    grads = _ref.distill_rows_ensemble_chunked_backward(
        grad_rows, student_hidden, student_items, teacher_hidden, teacher_items, target,
        lse_s, lse_st, lse_t, temperature, alpha, ignore_index,
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)  # whatever the inputs' strides, as the fake


@distill_rows_ensemble_backward.register_fake
def _(grad_rows, student_hidden, student_items, teacher_hidden, teacher_items, target, lse_s,
      lse_st, lse_t, temperature, alpha, ignore_index):  # fmt: skip
    return student_hidden.new_empty(student_hidden.shape), student_items.new_empty(
        student_items.shape
    )


def _setup_context(ctx, inputs, output):
    hs, ws, hts, wts, target, temperature, alpha, ignore_index = inputs
    _, lse_s, lse_st, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_st, lse_t)
    ctx.save_for_backward(hs, ws, target, lse_s, lse_st, lse_t, *hts, *wts)
    ctx.params = (len(hts), temperature, alpha, ignore_index)


def _backward(ctx, grad_loss, *_stat_grads):
    m, temperature, alpha, ignore_index = ctx.params
    hs, ws, target, lse_s, lse_st, lse_t, *teachers = ctx.saved_tensors
    hts, wts = teachers[:m], teachers[m:]
    d_hs = d_ws = None
    if grad_loss is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        d_hs, d_ws = distill_rows_ensemble_backward(
            grad_loss, hs, ws, hts, wts, target, lse_s, lse_st, lse_t, temperature, alpha,
            ignore_index,
        )  # fmt: skip
    # The teachers (and the target) never receive a gradient; a list input takes a list.
    return d_hs, d_ws, [None] * m, [None] * m, None, None, None, None


distill_rows_ensemble.register_autograd(_backward, setup_context=_setup_context)
