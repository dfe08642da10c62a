"""nn.SemanticAttention: multi-head self-attention with a learned time-interval bias."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from spnn_fast._checks import check_int
from spnn_fast.functional.attention import _UNSET, moved_key_padding_mask
from spnn_fast.limits import MAX_TIME_BUCKETS

__all__ = ["FastDropout", "SemanticAttention", "check_sizes"]


def check_sizes(owner: str, **sizes: object) -> None:
    """TypeError for a size that is not an integer (bool and float included), ValueError < 1."""
    for name, v in sizes.items():
        check_int(f"{owner}: {name}", v, 1)


# --------------------------------------------------------------------------------------------
# Semantic attention: SemanticAttention
# --------------------------------------------------------------------------------------------


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn from 32-bit random integers on the CPU.

    The same distribution as ``nn.Dropout(p)`` (each element kept with probability ``1 - p``,
    resolved to 2**-32, scaled by ``1 / (1 - p)``), from another random stream: one 64-bit draw
    of the CPU generator gives two elements' 32-bit lanes, where ``torch.rand`` spends a draw per
    element and PyTorch's CPU ``bernoulli_`` about 4x that. On other devices (and with
    ``inplace``) it is ``nn.Dropout`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        n = x.numel()
        bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)
        # lanes uniform over int32: kept when at or above the p-quantile
        cut = min(round(self.p * 2**32) - 2**31, 2**31 - 1)
        keep = bits.view(torch.int32)[:n].view(x.shape) >= cut
        # one float mask for the forward and the backward (bool * float * float is two passes
        # in each)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class SemanticAttention(nn.Module):
    """The semantic perception layer: multi-head self-attention with a learned time bias per head.

    ``forward(x [B, L, d_model], *, key_mask [B, L] bool = None (True = the key takes part),
    timestamps [B, L] int = None) -> [B, L, d_model]``: a fused q/k/v projection,
    :func:`spnn_fast.functional.semantic_attention` with this module's
    ``time_bias [n_heads, num_time_buckets]`` (used when timestamps are given), the output
    projection, dropout.

    Beside ``nn.MultiheadAttention``: one input ``x`` (self-attention: queries, keys and values
    all come from it) where ``mha(query, key, value)`` takes three, and the rest as keywords;
    ``key_mask`` has SDPA's polarity, the opposite of ``key_padding_mask``; the output is one
    tensor (no attention weights: the fused kernels never form them); ``dropout`` drops elements
    of the output, after the output projection (on the residual branch), where
    ``nn.MultiheadAttention``'s drops attention weights.

    Timestamps are int64 seconds: the gap between two events falls in bucket
    ``min(num_time_buckets - 1, bit_length(gap))``, so with 32 buckets only gaps over 2**30 s
    (34 years) share the last bucket, while in milliseconds every gap over 2**30 ms (12.4 days)
    would (see :func:`spnn_fast.functional.semantic_attention`).

    ``time_bias=False`` builds the module without the bias table: its ``time_bias`` is None (no
    parameter, nothing in the state dict) and timestamps are not used. A module with the table
    that is called without timestamps leaves ``time_bias`` out of the graph, with no gradient,
    which ``DistributedDataParallel`` (without ``find_unused_parameters``) and
    ``torch.autograd.grad(loss, module.parameters())`` refuse: build such a module with
    ``time_bias=False``.

    ``backend`` (None / "auto" / "triton" / "torch") is passed to the op; None follows
    ``SPNN_FAST_BACKEND`` or picks the fastest available.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        num_time_buckets: int = 32,
        causal: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
        backend: Optional[str] = None,
        *,
        time_bias: bool = True,
    ) -> None:
        super().__init__()
        check_sizes("SemanticAttention", d_model=d_model, n_heads=n_heads)
        for name, flag in (("causal", causal), ("time_bias", time_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"SemanticAttention: {name} must be a bool, got {flag!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if time_bias:
            why = " (time_bias=False builds the module without a time bias)"
            check_int("SemanticAttention: num_time_buckets", num_time_buckets, 1, why)
            if num_time_buckets > MAX_TIME_BUCKETS:
                raise ValueError(
                    f"SemanticAttention: num_time_buckets={num_time_buckets} must be in "
                    f"[1, {MAX_TIME_BUCKETS}]"
                )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.num_time_buckets = num_time_buckets if time_bias else 0
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        if time_bias:
            # Zero at start: every interval weighs the same until training says otherwise.
            self.time_bias = nn.Parameter(torch.zeros(n_heads, num_time_buckets))
        else:
            self.register_parameter("time_bias", None)  # as nn.Linear(bias=False)'s bias
        self.dropout = FastDropout(dropout)

    def forward(
        self,
        x: Tensor,
        *args: object,
        key_mask: Optional[Tensor] = None,
        timestamps: Optional[Tensor] = None,
        key_padding_mask: object = _UNSET,
    ) -> Tensor:
        """Self-attention over a batch of sequences.

        Args:
            x: ``[B, L, d_model]`` floating, the only positional input (a second one, as in
                ``nn.MultiheadAttention``'s ``(query, key, value)``, raises a TypeError).
            key_mask: ``[B, L]`` bool, True where the position is a real event that may be
                attended to (SDPA's boolean-mask polarity); None = every position. Passing
                ``key_padding_mask=`` (``nn.MultiheadAttention``'s name, True = padding) raises
                a TypeError rather than silently inverting the mask.
            timestamps: ``[B, L]`` integer seconds; with them the learned ``time_bias`` of the
                gap bucket between two events is added to their score (without, no bias; a
                module built with ``time_bias=False`` does not use them).

        Returns:
            ``[B, L, d_model]`` in the dtype of ``x``.
        """
        from spnn_fast.functional import semantic_attention

        if args:
            raise TypeError(
                f"SemanticAttention takes one input, x [B, L, {self.d_model}] (self-attention: "
                f"queries, keys and values all come from x), and keyword arguments key_mask=, "
                f"timestamps=; got {1 + len(args)} positional inputs. nn.MultiheadAttention's "
                f"mha(x, x, x, key_padding_mask=pad) is sa(x, key_mask=~pad)"
            )
        if key_padding_mask is not _UNSET:
            raise moved_key_padding_mask("SemanticAttention.forward()")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, {self.d_model}], got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = semantic_attention(
            q,
            k,
            v,
            key_mask=key_mask,
            causal=self.causal,
            timestamps=timestamps,
            time_bias=None if timestamps is None else self.time_bias,
            backend=self.backend,
        )
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, L, self.d_model)))

    def extra_repr(self) -> str:
        bias = (
            f"num_time_buckets={self.num_time_buckets}" if self.time_bias is not None
            else "time_bias=False"
        )  # fmt: skip
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, {bias}, causal={self.causal}, "
            f"dropout={self.dropout.p}, backend={self.backend!r}"
        )
