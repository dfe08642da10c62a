"""``semantic_attention``: multi-head self-attention with a learned per-head time bias."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from spnn_fast import limits
from spnn_fast._checks import describe, is_real
from spnn_fast.functional._dispatch import triton_or_torch

__all__ = ["semantic_attention"]


class _Unset:
    """The default of a keyword that is no longer an argument (a call that passes it is told)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def moved_key_padding_mask(owner: str) -> TypeError:
    """The error for ``key_padding_mask=``, whose meaning in ``nn.MultiheadAttention`` is the
    opposite of this package's mask."""
    return TypeError(
        f"{owner} takes key_mask= (bool [B, L], True where the key takes part, as SDPA's boolean "
        f"attn_mask), not key_padding_mask=: torch.nn.MultiheadAttention's key_padding_mask means "
        f"the opposite (True = padding). Pass key_mask=~key_padding_mask when porting from it"
    )


def _attn_check(q, k, v, key_mask, timestamps, time_bias) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor [B, H, L, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D] (4-D), got {describe(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {describe(t)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, H, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, D = q.shape
    if D < 1:
        raise ValueError(f"q, k, v must have a head dim D >= 1, got {describe(q)}")
    named = {"k": k, "v": v, "key_mask": key_mask, "timestamps": timestamps}
    named["time_bias"] = time_bias
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if key_mask is not None:
        if tuple(key_mask.shape) != (B, L):
            raise ValueError(
                f"key_mask must be [B, L] = [{B}, {L}] for q of shape {tuple(q.shape)}, "
                f"got {describe(key_mask)}"
            )
        if key_mask.dtype != torch.bool:
            raise ValueError(
                f"key_mask must be bool (True = the key takes part), got {describe(key_mask)}"
            )
    if timestamps is not None:
        if tuple(timestamps.shape) != (B, L):
            raise ValueError(
                f"timestamps must be [B, L] = [{B}, {L}] for q of shape {tuple(q.shape)}, "
                f"got {describe(timestamps)}"
            )
        if timestamps.dtype not in limits.ATTN_TIMESTAMP_DTYPES:
            raise ValueError(f"timestamps must be integer (seconds), got {describe(timestamps)}")
    if time_bias is not None:
        if time_bias.dim() != 2 or time_bias.shape[0] != H:
            raise ValueError(
                f"time_bias must be [H, NB] with H = {H} (q of shape {tuple(q.shape)}), "
                f"got {describe(time_bias)}"
            )
        if not 1 <= time_bias.shape[1] <= limits.MAX_TIME_BUCKETS:
            raise ValueError(
                f"time_bias must have 1 <= NB <= {limits.MAX_TIME_BUCKETS} buckets, "
                f"got {describe(time_bias)}"
            )
        if not time_bias.is_floating_point():
            raise ValueError(f"time_bias must be floating point, got {describe(time_bias)}")
        if timestamps is None:
            raise ValueError("timestamps [B, L] are required when time_bias is given")


def semantic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Optional[Tensor] = None,
    causal: bool = True,
    timestamps: Optional[Tensor] = None,
    time_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    key_padding_mask: object = _UNSET,
) -> Tensor:
    """Multi-head self-attention with a learned per-head time-interval bias.

    Args:
        q, k, v: ``[B, H, L, D]`` (batch, heads, length, head dim), one floating dtype.
        key_mask: ``[B, L]`` bool, True where the key takes part (a real event), as in SDPA's
            boolean ``attn_mask``; None = every key. ``key_padding_mask=`` (PyTorch's
            ``nn.MultiheadAttention`` name, whose True means padding) raises a TypeError.
        causal: a bool; query i attends to keys ``j <= i`` only.
        timestamps: ``[B, L]`` integer seconds (int64 Unix time, as the package's loaders and
            encoder give them); required with ``time_bias``, ignored without. The gap
            ``g = |t_i - t_j|`` falls in bucket ``min(NB - 1, bit_length(g))``: bucket ``b >= 1``
            holds gaps in ``[2**(b - 1), 2**b)`` seconds, so with ``NB = 32`` only gaps over
            2**30 s (34 years) share the last bucket. Milliseconds would shift every gap by 10
            buckets and put all gaps over 2**30 ms (12.4 days) into the last one: divide them
            by 1000 first.
        time_bias: ``[H, NB]`` floating, ``1 <= NB <= 64``: the learned bias table.
        scale: multiplies ``<q, k>``; default ``1 / sqrt(D)``.
        backend: None / "auto" / "triton" / "torch" (see :mod:`spnn_fast.backends`).

    Returns:
        ``[B, H, L, D]`` in the dtype of q, where
        ``score[b,h,i,j] = scale * <q_i, k_j> + time_bias[h, min(NB - 1, bit_length(|t_i - t_j|))]``
        and ``out_i = sum_j softmax_j(score) * v_j`` over admissible keys. A row with no admissible
        key is zero and passes no gradient. Differentiable in q, k, v and time_bias; every
        gradient is deterministic.

    Raises:
        ValueError: wrong types, ranks, shapes, dtypes or devices (the message names the
            argument), a non-finite ``scale``, or ``backend="triton"`` with a head dim or dtype the
            kernels lack (D <= 128; float32/float16/bfloat16). The kernels are built for D in
            16/32/64/128; another D <= 128 runs them on q, k, v padded with zero columns.
    """
    if key_padding_mask is not _UNSET:
        raise moved_key_padding_mask("semantic_attention()")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    _attn_check(q, k, v, key_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not is_real(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    scale = float(scale)

    def why_not():
        if D > limits.ATTN_HEAD_DIMS[-1] or q.dtype not in limits.ATTN_DTYPES:
            return (
                f"the kernels support head dims up to {limits.ATTN_HEAD_DIMS[-1]} and dtypes "
                f"float32/float16/bfloat16; got q of {describe(q)}"
            )
        return None

    name = triton_or_torch("semantic_attention", backend, q.device, why_not)
    if time_bias is None:
        timestamps = None
    elif timestamps.dtype != torch.int64:
        timestamps = timestamps.to(torch.int64)
    padded = D
    if name == "triton" and D not in limits.ATTN_HEAD_DIMS:
        # The kernels are compiled for D in 16/32/64/128: zero columns appended to q and k leave
        # every score unchanged (scale is that of the true D), those of v give output columns
        # that are cut off again, and autograd carries the gradients through the pad and the cut.
        padded = next(d for d in limits.ATTN_HEAD_DIMS if d >= D)
        q, k, v = (torch.nn.functional.pad(t, (0, padded - D)) for t in (q, k, v))
    from spnn_fast.ops.attention import attention_fwd, attention_probs_fwd
    from spnn_fast.reference.attention_cpu import keeps_probs

    grad = torch.is_grad_enabled()
    bias_grad = grad and time_bias is not None and time_bias.requires_grad
    grad = grad and (q.requires_grad or k.requires_grad or v.requires_grad or bias_grad)
    if name == "torch" and keeps_probs(q, time_bias, bias_grad, grad):
        # A bias gradient, or any gradient without a bias, over short windows on the CPU: the
        # forward keeps its probabilities (cheaper than the backward's recomputation there).
        out, _ = attention_probs_fwd(q, k, v, key_mask, timestamps, time_bias, bool(causal), scale)
    else:
        out, _ = attention_fwd(q, k, v, key_mask, timestamps, time_bias, bool(causal), scale, name)
    return out if padded == D else out[..., :D].contiguous()
