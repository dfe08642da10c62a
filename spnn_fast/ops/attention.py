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
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

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


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_mask, timestamps, time_bias = ctx.saved_tensors
    bias_grad = time_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dbias = semantic_attention_bwd(
        grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, ctx.causal,
        ctx.scale, ctx.backend, bias_grad,
    )  # fmt: skip
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None, None, None


semantic_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the op pair, called directly: an eager call of the op
    pays the custom op's dispatch in Python (about 0.3 ms a forward + backward on the CPU, 10% of
    a small call), and the fused CPU kernel's output is taken in the layout it comes in (the op
    copies it into the one its fake promises when q is laid out [B, H, L, D]).
    :func:`attention_fwd` takes this path only where nothing traces the call."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, timestamps, time_bias, causal, scale, backend):
        out, lse = _fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend,
                        any_layout=True)  # fmt: skip
        _setup_context(ctx, (q, k, v, key_mask, timestamps, time_bias, causal, scale, backend),
                       (out, lse))  # fmt: skip
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_mask, timestamps, time_bias = ctx.saved_tensors
        bias_grad = time_bias is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dbias = _bwd(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias,
                                 ctx.causal, ctx.scale, ctx.backend, bias_grad)  # fmt: skip
        return dq, dk, dv, None, None, dbias, None, None, None


def _traced(tensors) -> bool:
    """Whether anything may be tracing or transforming a call on ``tensors``: torch.compile or
    export, a tensor subclass (fake, functional, proxy), a dispatch mode, a functorch transform.
    Only then does the call need the registered op."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (
        torch.compiler.is_compiling()
        or any(t is not None and type(t) is not Tensor for t in tensors)
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()
    )


def attention_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, backend):
    """``semantic_attention_fwd``, through :class:`_EagerAttention` on the CPU torch path where
    nothing traces the call (the same functions, without the op's dispatch)."""
    args = (q, k, v, key_mask, timestamps, time_bias, causal, scale, backend)
    if backend == "torch" and not _traced((q, k, v, key_mask, timestamps, time_bias)):
        return _EagerAttention.apply(*args)
    return semantic_attention_fwd(*args)


# The CPU path of a time-bias gradient over short windows: the forward keeps the probabilities
# [B, H, L, L] for the backward (spnn_fast.reference.attention_cpu.keeps_probs decides).


@torch.library.custom_op("spnn_fast::semantic_attention_probs_fwd", mutates_args=())
def semantic_attention_probs_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    timestamps: Tensor,
    time_bias: Tensor,
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    from spnn_fast.reference.attention_cpu import probs_fwd

    return probs_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale)


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
    timestamps: Tensor,
    time_bias: Tensor,
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from spnn_fast.reference.attention_cpu import probs_bwd

    dq, dk, dv, dbias = probs_bwd(grad_out, q, k, v, out, probs, key_mask, timestamps,
                                  time_bias, causal, scale, bias_grad)  # fmt: skip
    return dq, dk, dv, (q.new_empty((0,)) if dbias is None else dbias)


@semantic_attention_probs_bwd.register_fake
def _(grad_out, q, k, v, out, probs, key_mask, timestamps, time_bias, causal, scale, bias_grad):
    dbias = time_bias.new_empty(time_bias.shape) if bias_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _probs_setup_context(ctx, inputs, output):
    q, k, v, key_mask, timestamps, time_bias, causal, scale = inputs
    out, probs = output
    ctx.save_for_backward(q, k, v, out, probs, key_mask, timestamps, time_bias)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(probs)


def _probs_backward(ctx, grad_out, grad_probs):
    q, k, v, out, probs, key_mask, timestamps, time_bias = ctx.saved_tensors
    bias_grad = ctx.needs_input_grad[5]
    dq, dk, dv, dbias = semantic_attention_probs_bwd(
        grad_out, q, k, v, out, probs, key_mask, timestamps, time_bias, ctx.causal, ctx.scale,
        bias_grad,
    )  # fmt: skip
    return dq, dk, dv, None, None, (dbias if bias_grad else None), None, None


semantic_attention_probs_fwd.register_autograd(_probs_backward, setup_context=_probs_setup_context)
