"""The baselines the semantic attention is benchmarked against, written once for the benchmarks
and the GPU check: what stock PyTorch offers for the op.

* :func:`semantic_attention_sdpa` - ``scaled_dot_product_attention`` with the mask and the bias
  as one additive float mask;
* :func:`semantic_attention_sdpa_bool` - without a bias, SDPA with a boolean mask;
* :func:`semantic_attention_flex` - compiled FlexAttention with the bias as a ``score_mod``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from spnn_fast.reference.attention import admissible, bias_scores

__all__ = [
    "flex_unavailable_reason",
    "semantic_attention_flex",
    "semantic_attention_sdpa",
    "semantic_attention_sdpa_bool",
]


def semantic_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    timestamps: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with mask and bias as one additive float mask.

    The mask is ``[B, H, L, L]`` in the dtype of ``q`` (``[B or 1, 1, L, L]`` without a bias):
    the benchmark baseline that stock PyTorch offers for this op. Rows without admissible keys
    attend to every key (finite softmax) and are then multiplied by zero.
    """
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = admissible(L, key_mask, causal, q.device)
    if time_bias is not None:
        mask = bias_scores(timestamps, time_bias).to(q.dtype)
    elif allowed is not None:
        mask = torch.zeros((1, 1, L, L), dtype=q.dtype, device=q.device)
    else:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    nonempty = allowed.any(dim=-1, keepdim=True)
    mask = mask.masked_fill(~(allowed | ~nonempty), torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * nonempty.to(out.dtype)


def semantic_attention_sdpa_bool(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the padding and causality as one boolean
    ``attn_mask`` and no bias: what stock PyTorch offers for the bias-free op (the benchmark
    baseline). Rows without admissible keys attend to every key, then are multiplied by zero."""
    L = q.shape[2]
    allowed = admissible(L, key_mask, causal, q.device)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    nonempty = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~nonempty, scale=scale)
    return out * nonempty.to(out.dtype)


_FLEX = {}


def flex_unavailable_reason(device: torch.device, backward: bool) -> Optional[str]:
    """None when compiled FlexAttention can run here (with a backward if asked), else why not."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if backward and torch.device(device).type == "cpu":
        return f"FlexAttention has no CPU backward in torch {torch.__version__}"
    return None


def _flex_mods(
    key_mask: Optional[torch.Tensor],
    causal: bool,
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
) -> Tuple[Optional[Callable], Optional[Callable]]:
    score_mod = None
    if time_bias is not None:
        ts = timestamps.to(torch.int64)
        top = time_bias.shape[1] - 1

        def score_mod(score, b, h, q_idx, kv_idx):
            g = (ts[b, q_idx] - ts[b, kv_idx]).abs()
            e = torch.frexp(g.to(torch.float32)).exponent.to(torch.int64).clamp(1, 63)
            e = e - (torch.bitwise_left_shift(torch.ones_like(e), e - 1) > g).to(torch.int64)
            return score + time_bias[h, e.clamp(max=top)]

    mask_mod = None
    if causal and key_mask is not None:
        mask_mod = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & key_mask[b, kv_idx]
    elif causal:
        mask_mod = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
    elif key_mask is not None:
        mask_mod = lambda b, h, q_idx, kv_idx: key_mask[b, kv_idx]
    return score_mod, mask_mod


def semantic_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    timestamps: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    block_mask=None,
) -> torch.Tensor:
    """Compiled FlexAttention: the bias as a ``score_mod`` (same bucket arithmetic), the causal
    and padding masks as a block mask, built here unless ``block_mask`` is given (the padding
    differs per batch, so a caller builds one per batch).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    B, H, L, D = q.shape
    score_mod, mask_mod = _flex_mods(key_mask, causal, timestamps, time_bias)
    if block_mask is None and mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B, None, L, L, device=q.device)
    return _FLEX["fn"](q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
