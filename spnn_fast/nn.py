"""Modules of spnn_fast: each ``forward`` is one call into :mod:`spnn_fast.functional`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Semantic attention: SemanticAttention
# --------------------------------------------------------------------------------------------


class SemanticAttention(nn.Module):
    """The semantic perception layer: multi-head self-attention with a learned time bias per head.

    ``forward(x [B, L, d_model], key_padding_mask [B, L] bool = None, timestamps [B, L] int = None)
    -> [B, L, d_model]``: a fused q/k/v projection, :func:`spnn_fast.functional.semantic_attention`
    with this module's ``time_bias [n_heads, num_time_buckets]`` (used when timestamps are given),
    the output projection, dropout.

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
    ) -> None:
        super().__init__()
        if n_heads < 1 or d_model < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if not 1 <= num_time_buckets <= 64:
            raise ValueError(f"num_time_buckets={num_time_buckets} must be in [1, 64]")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.num_time_buckets, self.causal, self.backend = num_time_buckets, causal, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Zero at start: every interval weighs the same until training says otherwise.
        self.time_bias = nn.Parameter(torch.zeros(n_heads, num_time_buckets))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        timestamps: Optional[Tensor] = None,
    ) -> Tensor:
        from spnn_fast.functional import semantic_attention

        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, {self.d_model}], got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = semantic_attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=self.causal,
            timestamps=timestamps,
            time_bias=self.time_bias if timestamps is not None else None,
            backend=self.backend,
        )
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, L, self.d_model)))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, "
            f"num_time_buckets={self.num_time_buckets}, causal={self.causal}, "
            f"dropout={self.dropout.p}, backend={self.backend!r}"
        )
