"""torch.library registration of semantic attention (forward, backward, fake, autograd).

Two custom ops, both dispatching on a ``backend`` string ("triton" or "torch") that
``spnn_fast.functional.semantic_attention`` resolved:

* ``spnn_fast::semantic_attention_fwd(q, k, v, mask?, timestamps?, time_bias?, causal, scale,
  backend) -> (out, lse)``
* ``spnn_fast::semantic_attention_bwd(grad_out, q, k, v, out, lse, mask?, timestamps?,
  time_bias?, causal, scale, backend, bias_grad) -> (dq, dk, dv, dtime_bias)``
  (``dtime_bias`` is an empty tensor when ``bias_grad`` is False)

and, for a time-bias gradient on the CPU over short windows, the pair
``spnn_fast::semantic_attention_probs_fwd`` / ``semantic_attention_probs_bwd``, whose forward
keeps the probabilities [B, H, L, L] for the backward.

The autograd formula saves the inputs, ``out`` and ``lse`` and calls the backward op, so
``torch.compile`` traces both as single nodes (no graph break) and both are ``opcheck``-ed.
Eager calls on the CPU torch path (:func:`attention_fwd`, :func:`attention_probs_fwd`) run the
same functions without the ops' dispatch (``spnn_fast/ops/_eager.py``).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.ops._eager import eager_function, traced

__all__ = [
    "semantic_attention_bwd",
    "semantic_attention_fwd",
    "semantic_attention_probs_bwd",
    "semantic_attention_probs_fwd",
]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend, any_layout=False):
    args = (q, k, v, key_mask, timestamps, time_bias, causal, scale)
    if backend == "triton":
        from spnn_fast.kernels.attention import semantic_attention_fwd

        out, lse = semantic_attention_fwd(*args)
    else:
        from spnn_fast.reference.attention import semantic_attention_torch_fwd

        out, lse = semantic_attention_torch_fwd(*args, any_layout=any_layout)
    return out, lse.to(_lse_dtype(q.dtype))  # .to keeps the layout


@torch.library.custom_op("spnn_fast::semantic_attention_fwd", mutates_args=())
def semantic_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    timestamps: Optional[Tensor],
    time_bias: Optional[Tensor],
    causal: bool,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    return _fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend)


def _layout(q: Tensor, backend: str, *shape: int) -> Tensor:
    """An empty output of the op's real layout: the CPU torch path returns PyTorch's fused
    kernel's outputs as they are (``[B, L, H, ...]`` strides), the others contiguous ones."""
    if backend == "torch":
        from spnn_fast.reference.attention_cpu import cpu_layout

        return cpu_layout(q, *shape)
    return q.new_empty(shape)


@semantic_attention_fwd.register_fake
def _(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend):
    lse = _layout(q, backend, *q.shape[:-1]).to(_lse_dtype(q.dtype))
    return _layout(q, backend, *q.shape), lse


@torch.library.custom_op("spnn_fast::semantic_attention_bwd", mutates_args=())
def semantic_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_mask: Optional[Tensor],
    timestamps: Optional[Tensor],
    time_bias: Optional[Tensor],
    causal: bool,
    scale: float,
    backend: str,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _bwd(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias,
                             causal, scale, backend, bias_grad)  # fmt: skip
    return dq, dk, dv, (q.new_empty((0,)) if dbias is None else dbias)


def _bwd(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, causal, scale, backend,
         bias_grad):  # fmt: skip
    """(dq, dk, dv, dtime_bias or None)."""
    if backend == "triton":
        from spnn_fast.kernels.attention import semantic_attention_bwd as launch
    else:
        from spnn_fast.reference.attention import semantic_attention_torch_bwd as launch
    bias_grad = bias_grad and time_bias is not None
    return launch(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, causal, scale,
                  bias_grad)  # fmt: skip


@semantic_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, causal, scale,
      backend, bias_grad):  # fmt: skip
    if bias_grad and time_bias is not None:
        # the torch path's bias gradient runs its own recurrence: contiguous gradients
        dbias = time_bias.new_empty(time_bias.shape)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias
    return (*(_layout(q, backend, *q.shape) for _ in "qkv"), q.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, timestamps, time_bias, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, timestamps, time_bias)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse, bwd=semantic_attention_bwd):
    q, k, v, out, lse, key_mask, timestamps, time_bias = ctx.saved_tensors
    bias_grad = time_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dbias = bwd(
        grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, ctx.causal,
        ctx.scale, ctx.backend, bias_grad,
    )  # fmt: skip
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None, None, None


semantic_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# The CPU path of a time-bias gradient over short windows: the forward keeps the probabilities
# [B, H, L, L] for the backward (spnn_fast.reference.attention_cpu.keeps_probs decides).


@torch.library.custom_op("spnn_fast::semantic_attention_probs_fwd", mutates_args=())
def semantic_attention_probs_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    timestamps: Optional[Tensor],
    time_bias: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    return _probs_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale)


def _probs_fwd(*args):
    from spnn_fast.reference.attention_cpu import probs_fwd

    return probs_fwd(*args)


@semantic_attention_probs_fwd.register_fake
def _(q, k, v, key_mask, timestamps, time_bias, causal, scale):
    B, H, L, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, L, L), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("spnn_fast::semantic_attention_probs_bwd", mutates_args=())
def semantic_attention_probs_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    probs: Tensor,
    key_mask: Optional[Tensor],
    timestamps: Optional[Tensor],
    time_bias: Optional[Tensor],
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _probs_bwd(grad_out, q, k, v, out, probs, key_mask, timestamps,
                                   time_bias, causal, scale, bias_grad)  # fmt: skip
    return dq, dk, dv, (q.new_empty((0,)) if dbias is None else dbias)


def _probs_bwd(*args):
    from spnn_fast.reference.attention_cpu import probs_bwd

    return probs_bwd(*args)


@semantic_attention_probs_bwd.register_fake
def _(grad_out, q, k, v, out, probs, key_mask, timestamps, time_bias, causal, scale, bias_grad):
    want = bias_grad and time_bias is not None
    dbias = time_bias.new_empty(time_bias.shape) if want else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _probs_setup_context(ctx, inputs, output):
    q, k, v, key_mask, timestamps, time_bias, causal, scale = inputs
    out, probs = output
    ctx.save_for_backward(q, k, v, out, probs, key_mask, timestamps, time_bias)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(probs)


def _probs_backward(ctx, grad_out, grad_probs, bwd=semantic_attention_probs_bwd):
    q, k, v, out, probs, key_mask, timestamps, time_bias = ctx.saved_tensors
    bias_grad = time_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dbias = bwd(
        grad_out, q, k, v, out, probs, key_mask, timestamps, time_bias, ctx.causal, ctx.scale,
        bias_grad,
    )  # fmt: skip
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None, None


semantic_attention_probs_fwd.register_autograd(_probs_backward, setup_context=_probs_setup_context)


# Eager calls: the same forwards and backwards as the op pairs, called directly. An eager call of
# an op pays the custom op's dispatch in Python (about 0.3 ms a forward + backward on the CPU,
# 10% of a small call); and the fused CPU kernel's output is taken in the layout it comes in
# (the op copies it into the one its fake promises when q is laid out [B, H, L, D]).


_EagerAttention = eager_function(
    "_EagerAttention", lambda *a: _fwd(*a, any_layout=True), _setup_context, _backward, _bwd
)
_EagerProbs = eager_function(
    "_EagerProbs", _probs_fwd, _probs_setup_context, _probs_backward, _probs_bwd
)


def attention_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend):
    """``semantic_attention_fwd``, or the same functions without the op's dispatch on the CPU
    torch path where nothing traces the call."""
    args = (q, k, v, key_mask, timestamps, time_bias, causal, scale, backend)
    if backend == "torch" and not traced(args[:6]):
        return _EagerAttention.apply(*args)
    return semantic_attention_fwd(*args)


def attention_probs_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale):
    """``semantic_attention_probs_fwd``, or the same functions without the op's dispatch where
    nothing traces the call."""
    args = (q, k, v, key_mask, timestamps, time_bias, causal, scale)
    if not traced(args[:6]):
        return _EagerProbs.apply(*args)
    return semantic_attention_probs_fwd(*args)
