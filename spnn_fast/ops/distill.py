"""``spnn_fast::distill_rows``: fused linear distillation + CE, per row, with its backward.

The forward returns the row losses [N] (0 at ignored rows), the three per-row statistics the
backward recomputes the logits from and, from the Triton kernels, the rows' gradient
dloss_n/d student_hidden_n [N, Ds] (empty from the torch path, which computes it in the
backward); ``backend`` is ``"triton"`` (kernels/distill.py) or ``"torch"`` (the chunked path in
spnn_fast/reference/distill.py). The teacher gets no gradient.
"""

# No ``from __future__ import annotations``: torch.library reads the annotations as types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference import distill as _ref

__all__ = ["distill_rows"]


def _kernels():
    from spnn_fast.kernels import distill  # lazy: Triton is imported on the first Triton call

    return distill


@torch.library.custom_op("spnn_fast::distill_rows", mutates_args=())
def distill_rows(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [N], lse_s [N], lse_sT [N], lse_tT [N], d_hidden_rows) in the accumulation dtype;
    d_hidden_rows is [N, Ds] from the Triton kernels and empty from the torch path. Targets are
    checked by the caller (:func:`spnn_fast.functional.distillation_loss`): the op only
    launches, without waiting for the device."""
    args = (student_hidden, student_items, teacher_hidden, teacher_items, target)
    if backend == "triton":
        return _kernels().distill_fwd(*args, temperature, alpha, ignore_index)
    rows = _ref.distill_rows_chunked(*args, temperature, alpha, ignore_index)
    return (*rows, rows[0].new_empty((0,)))


@distill_rows.register_fake
def _(student_hidden, student_items, teacher_hidden, teacher_items, target, temperature, alpha,
      ignore_index, backend):  # fmt: skip
    n = student_hidden.shape[0]
    cdt = _ref.compute_dtype(student_hidden.dtype)
    d_rows = (n, student_hidden.shape[1]) if backend == "triton" else (0,)
    rows = tuple(student_hidden.new_empty(n, dtype=cdt) for _ in range(4))
    return (*rows, student_hidden.new_empty(d_rows, dtype=cdt))


@torch.library.custom_op("spnn_fast::distill_rows_backward", mutates_args=())
def distill_rows_backward(
    grad_rows: Tensor,
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_tt: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    backend: str,
    d_hidden_rows: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(d_student_hidden, d_student_items) for ``grad_rows`` [N] on the row losses; the Triton
    path takes d_student_hidden from the forward's ``d_hidden_rows`` when given."""
    args = (grad_rows, student_hidden, student_items, teacher_hidden, teacher_items, target)
    stats = (lse_s, lse_st, lse_tt, temperature, alpha, ignore_index)
    if backend == "triton":
        grads = _kernels().distill_bwd(*args, *stats, d_hidden_rows=d_hidden_rows)
    else:
        grads = _ref.distill_rows_chunked_backward(*args, *stats)
    # contiguous whatever the inputs' strides, as the fake below says (a transposed table too)
    return tuple(g.contiguous() for g in grads)


@distill_rows_backward.register_fake
def _(grad_rows, student_hidden, student_items, teacher_hidden, teacher_items, target, lse_s,
      lse_st, lse_tt, temperature, alpha, ignore_index, backend, d_hidden_rows=None):  # fmt: skip
    return student_hidden.new_empty(student_hidden.shape), student_items.new_empty(
        student_items.shape
    )


def _setup_context(ctx, inputs, output):
    hs, ws, ht, wt, target, temperature, alpha, ignore_index, backend = inputs
    _, lse_s, lse_st, lse_tt, d_rows = output
    ctx.mark_non_differentiable(lse_s, lse_st, lse_tt, d_rows)
    ctx.save_for_backward(hs, ws, ht, wt, target, lse_s, lse_st, lse_tt, d_rows)
    ctx.params = (temperature, alpha, ignore_index, backend)


def _backward(ctx, grad_loss, *_stat_grads):
    hs, ws, ht, wt, target, lse_s, lse_st, lse_tt, d_rows = ctx.saved_tensors
    temperature, alpha, ignore_index, backend = ctx.params
    d_hs = d_ws = None
    if grad_loss is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        d_hs, d_ws = distill_rows_backward(
            grad_loss, hs, ws, ht, wt, target, lse_s, lse_st, lse_tt,
            temperature, alpha, ignore_index, backend, d_rows if d_rows.numel() else None,
        )  # fmt: skip
    # The teacher (and the target) never receive a gradient.
    return d_hs, d_ws, None, None, None, None, None, None, None


distill_rows.register_autograd(_backward, setup_context=_setup_context)


class _EagerCrossEntropy(torch.autograd.Function):
    """The plain cross-entropy (no teacher) of an eager CPU call: the forward keeps its
    exponentials for the backward (spnn_fast.reference.ce_kept), without the op's dispatch."""

    @staticmethod
    def forward(ctx, hidden, items, target, ignore_index):
        from spnn_fast.reference.ce_kept import ce_rows_kept

        loss, _, e, sums, rows = ce_rows_kept(hidden, items, target, ignore_index)
        ctx.save_for_backward(hidden, items, target)
        ctx.kept, ctx.ignore_index = (e, sums, rows), ignore_index
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        from spnn_fast.reference.ce_kept import ce_rows_kept_backward

        hidden, items, target = ctx.saved_tensors
        d_hidden, d_items = ce_rows_kept_backward(
            grad_rows, hidden, items, target, ctx.ignore_index, *ctx.kept,
            need_hidden=ctx.needs_input_grad[0], need_items=ctx.needs_input_grad[1],
        )  # fmt: skip
        return d_hidden, d_items, None, None


def distill_rows_call(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """The row losses [N] of :func:`distill_rows`; an eager plain cross-entropy on the CPU whose
    exponentials fit the budget keeps them for its backward instead (three products a step
    where the op's backward forms the logits again: four)."""
    from spnn_fast.ops._eager import traced
    from spnn_fast.reference.ce_kept import keeps_exponentials

    hs, ws = student_hidden, student_items
    if (
        backend == "torch"
        and alpha == 0.0
        and target is not None
        and hs.device.type == "cpu"
        and keeps_exponentials(hs, ws)
        and not traced((hs, ws, target))
    ):
        return _EagerCrossEntropy.apply(hs, ws, target, ignore_index)
    args = (hs, ws, teacher_hidden, teacher_items, target, temperature, alpha, ignore_index)
    return distill_rows(*args, backend)[0]
