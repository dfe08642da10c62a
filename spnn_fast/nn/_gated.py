"""The event features' gated sum, ``SPNN.embed``'s fusion, with a backward that writes each
feature's gradient once.

``gated_sum(stacked [..., F, d], weight [F, F * d], bias [F]) -> (x [..., d], gate [..., F])``
with ``gate = softmax(stacked.flatten(-2) @ weight.T + bias)`` and ``x = sum_f gate_f *
stacked_f``. Through autograd, ``stacked`` receives two gradients (from the gate's logits and
from the sum), each a ``[N, F, d]`` tensor, which autograd then adds: on ml-100k's teacher that
add, and the logits' gradient product with its 7 columns (a slow shape for MKL, 2.4x a product
with 8), took 6% of a one-thread step. Eager CPU calls take :class:`_GatedSum`, whose backward
forms the logits' part with the gate padded to a multiple of 8 outputs and accumulates the
sum's part into it in place (one batched rank-1 update), for features of at least
:data:`FUSED_FROM_D` dims; narrower ones, and anything traced, take the plain ops.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gated_sum"]


def _padded(weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """The gate with its outputs padded with zero rows to a multiple of 8."""
    pad = -weight.shape[0] % 8
    return F.pad(weight, (0, 0, 0, pad)), F.pad(bias, (0, pad))


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacked, weight, bias):
        *lead, nf, d = stacked.shape
        s = stacked.reshape(-1, nf, d)
        flat = s.view(-1, nf * d)
        w8, b8 = _padded(weight, bias)
        gate = torch.softmax(torch.addmm(b8, flat, w8.T)[:, :nf], dim=-1)
        x = torch.bmm(gate.unsqueeze(1), s).squeeze(1)
        ctx.save_for_backward(s, weight, gate)
        ctx.shape = stacked.shape
        return x.view(*lead, d), gate.view(*lead, nf)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx, dgate):
        s, weight, gate = ctx.saved_tensors
        n, nf, d = s.shape
        dx = dx.reshape(n, d)
        d_gate = torch.bmm(s, dx.unsqueeze(2)).squeeze(2)  # [N, F]
        if dgate is not None:
            d_gate = d_gate + dgate.reshape(n, nf)
        d_logits = gate * (d_gate - (d_gate * gate).sum(dim=-1, keepdim=True))  # softmax's
        w8 = F.pad(weight, (0, 0, 0, -nf % 8))  # the forward's padding, the bias not needed
        d_logits8 = F.pad(d_logits, (0, w8.shape[0] - nf))
        d_s = (d_logits8 @ w8).view(n, nf, d)
        d_s.baddbmm_(gate.unsqueeze(2), dx.unsqueeze(1))  # + gate_f * dx, in place
        d_weight = d_logits.T @ s.view(n, nf * d) if ctx.needs_input_grad[1] else None
        d_bias = d_logits.sum(dim=0) if ctx.needs_input_grad[2] else None
        return d_s.view(ctx.shape), d_weight, d_bias


def _plain(stacked: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    gate = torch.softmax(F.linear(stacked.flatten(-2), weight, bias), dim=-1)
    return (gate.unsqueeze(-1) * stacked).sum(-2), gate


# Feature widths from which eager CPU calls take _GatedSum: its per-event products ([1, F] @ [F, d]
# batched over the events) lose to the broadcast product and sum on narrow features (ml-100k's
# student, d = 24, one thread: 17 ms against 11 ms forward + backward for 7,680 events) and win
# on wide ones (the teacher, d = 64: 23 ms against 28 ms; two threads 13.6 ms against 13.7 ms).
FUSED_FROM_D = 64


def gated_sum(stacked: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """``(x [..., d], gate [..., F])``; see the module docstring."""
    from spnn_fast.ops._eager import traced

    if (
        stacked.device.type == "cpu"
        and stacked.shape[-1] >= FUSED_FROM_D
        and stacked.numel()
        and not traced((stacked, weight, bias))
    ):
        return _GatedSum.apply(stacked, weight, bias)
    return _plain(stacked, weight, bias)
