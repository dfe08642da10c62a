"""``spnn_fast::feature_distill_rows``: weighted distance of layer-normed embeddings (Triton).

Forward: row losses [N] (fp32) from kernels/feature_distill.py; backward: the gradient for
``student_emb`` only. The ``backend="torch"`` path does not go through this op: it is
:func:`spnn_fast.reference.feature_distill.feature_distillation_rows_reference` under autograd.
"""

# No ``from __future__ import annotations``: torch.library reads the annotations as types.
import torch
from torch import Tensor

__all__ = ["feature_distill_rows"]


def _kernels():
    from spnn_fast.kernels import feature_distill  # lazy: Triton loads on the first Triton call

    return feature_distill


@torch.library.custom_op("spnn_fast::feature_distill_rows", mutates_args=())
def feature_distill_rows(
    student_emb: Tensor, teacher_emb: Tensor, weights: Tensor, eps: float
) -> Tensor:
    return _kernels().feature_distill_fwd(student_emb, teacher_emb, weights, eps)


@feature_distill_rows.register_fake
def _(student_emb, teacher_emb, weights, eps):
    return student_emb.new_empty(student_emb.shape[0], dtype=torch.float32)


@torch.library.custom_op("spnn_fast::feature_distill_rows_backward", mutates_args=())
def feature_distill_rows_backward(
    grad_rows: Tensor, student_emb: Tensor, teacher_emb: Tensor, weights: Tensor, eps: float
) -> Tensor:
    # contiguous whatever the inputs' strides, as the fake below says
    return (
        _kernels()
        .feature_distill_bwd(grad_rows, student_emb, teacher_emb, weights, eps)
        .contiguous()
    )


@feature_distill_rows_backward.register_fake
def _(grad_rows, student_emb, teacher_emb, weights, eps):
    return student_emb.new_empty(student_emb.shape)


def _setup_context(ctx, inputs, output):
    s, t, w, eps = inputs
    ctx.save_for_backward(s, t, w)
    ctx.eps = eps


def _backward(ctx, grad_rows):
    s, t, w = ctx.saved_tensors
    d_s = None
    if ctx.needs_input_grad[0]:
        d_s = feature_distill_rows_backward(grad_rows, s, t, w, ctx.eps)
    return d_s, None, None, None  # the teacher side and the weights get no gradient


feature_distill_rows.register_autograd(_backward, setup_context=_setup_context)
