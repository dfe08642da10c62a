"""Eager calls of the package's ops without the custom op's dispatch.

A call of a ``torch.library.custom_op`` pays its dispatch in Python (about 0.1-0.15 ms a call on
the CPU, forward and backward each). Where nothing traces a call, the ops' front ends run the same
forward and backward functions under an ``autograd.Function`` instead; torch.compile, export, fake
tensors, dispatch modes and functorch transforms still get the registered op.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eager_function", "traced"]


def eager_function(name, fwd, setup_context, backward, bwd):
    """An autograd.Function running ``fwd`` and, for the backward, ``backward`` with ``bwd``
    in place of the backward op."""

    def forward(ctx, *args):
        outputs = fwd(*args)
        setup_context(ctx, args, outputs)
        return outputs

    def run_backward(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(torch.autograd.function.once_differentiable(run_backward)),
    })  # fmt: skip


def traced(tensors) -> bool:
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
