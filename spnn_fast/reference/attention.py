"""Semantic attention: multi-head self-attention with a learned time-interval bias per head.

For ``q, k, v: [B, H, L, D]``, ``timestamps t: [B, L]`` (int64 seconds), ``time_bias: [H, NB]``::

    score[b,h,i,j] = scale * <q[b,h,i], k[b,h,j]> + time_bias[h, bucket(|t[b,i] - t[b,j]|)]
    bucket(g)      = min(NB - 1, bit_length(g))                 (spnn_fast.reference.time_bucket)

Keys with ``j > i`` (causal) or ``key_mask[b, j] == False`` are excluded, the softmax runs
over the admissible keys and ``out[b,h,i] = sum_j p[b,h,i,j] * v[b,h,j]``. A query row without any
admissible key outputs zeros, and no gradient flows through it.

This module holds, written once:

* :func:`semantic_attention_math` - the eager definition that forms the scores. It is the test
  oracle and the "eager" benchmark baseline.
* :func:`semantic_attention_torch_fwd` / :func:`semantic_attention_torch_bwd` - the PyTorch path
  (``backend="torch"``, any device): the flash recurrence in chunks of query rows. The forward
  keeps only the log-sum-exp per row; the backward recomputes the scores chunk by chunk, so memory
  stays at one chunk of ``[B, H, rows, L]`` and no ``[B, H, L, L]`` tensor is ever formed. On the
  CPU they run PyTorch's fused kernel instead where it serves the call
  (:mod:`spnn_fast.reference.attention_cpu`), and the time bias's mask and gradient come from
  the C++ helpers (:mod:`spnn_fast.reference.time_bias_cpp`).
The benchmark baselines (SDPA, FlexAttention) live in
:mod:`spnn_fast.reference.attention_baselines`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from spnn_fast.reference import time_bias_cpp
from spnn_fast.reference.time_bucket import time_bucket

__all__ = [
    "admissible",
    "bias_scores",
    "semantic_attention_math",
    "semantic_attention_torch_bwd",
    "semantic_attention_torch_fwd",
]


# Elements of one chunk of scores [B, H, rows, L] in the PyTorch path (16 Mi fp32 = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _pair_buckets(t_q: torch.Tensor, t_k: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``time_bucket(|t_q[b, i] - t_k[b, j]|, num_buckets)`` as an int64 ``[B, Lq, Lk]`` tensor."""
    gap = (t_q.to(torch.int64).unsqueeze(-1) - t_k.to(torch.int64).unsqueeze(-2)).abs_()
    return time_bucket(gap, num_buckets)


def bias_scores(timestamps: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
    """The bias term ``time_bias[h, bucket(|t_i - t_j|)]`` as ``[B, H, L, L]`` (time_bias dtype)."""
    bucket = _pair_buckets(timestamps, timestamps, time_bias.shape[1])  # [B, L, L]
    return time_bias[:, bucket].transpose(0, 1)


def admissible(
    L: int,
    key_mask: Optional[torch.Tensor],
    causal: bool,
    device: torch.device,
    rows: Optional[Tuple[int, int]] = None,
    keys: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """Bool ``[B or 1, 1, rows, keys]``: True where query i may attend to key j; None if all may.

    ``rows=(r0, r1)`` restricts to query rows ``r0 <= i < r1`` and ``keys`` to keys ``j < keys``.
    """
    r0, r1 = rows if rows is not None else (0, L)
    nk = L if keys is None else keys
    allowed = None
    if causal:
        i = torch.arange(r0, r1, device=device)
        j = torch.arange(nk, device=device)
        allowed = (j[None, :] <= i[:, None])[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, :nk]
        allowed = km if allowed is None else allowed & km
    return allowed


def semantic_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    timestamps: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The definition, in eager PyTorch ops over the full ``[B, H, L, L]`` scores (autograd).

    Computes in the dtype of ``q``; run it in float64 for an oracle.
    """
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if time_bias is not None:
        scores = scores + bias_scores(timestamps, time_bias).to(scores.dtype)
    allowed = admissible(L, key_mask, causal, q.device)
    if allowed is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row without admissible keys would be all -inf (NaN softmax): give it finite scores, then
    # zero its probabilities, so its output and every gradient through it are exactly zero.
    empty = ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.matmul(p, v)


# ---------------------------------------------------------------------------------------------
# The PyTorch path: flash recurrence over chunks of query rows, backward by recomputation.
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(B: int, H: int, L: int):
    rows = max(1, min(L, _CHUNK_ELEMENTS // max(1, B * H * L)))
    for r0 in range(0, L, rows):
        yield r0, min(L, r0 + rows)


def _chunk_scores(qc, k, key_mask, timestamps, time_bias, causal, scale, r0, r1):
    """Scores of query rows [r0, r1) against keys [0, nk), with -inf where not admissible, and
    the int64 gap buckets (None where the C++ helpers added the bias)."""
    L = k.shape[2]
    nk = r1 if causal else L
    s = torch.matmul(qc, k[:, :, :nk].transpose(-1, -2)).mul_(scale)
    bucket = None
    if time_bias is not None and time_bias_cpp.available(s, timestamps):
        time_bias_cpp.bias_into(s, key_mask, timestamps, time_bias, causal, r0, accumulate=True)
        return s, None, None, nk
    if time_bias is not None:
        bucket = _pair_buckets(timestamps[:, r0:r1], timestamps[:, :nk], time_bias.shape[1])
        s += time_bias.to(s.dtype)[:, bucket].transpose(0, 1)
    allowed = admissible(L, key_mask, causal, qc.device, rows=(r0, r1), keys=nk)
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    return s, allowed, bucket, nk


def _masked_keys(k, v, key_mask):
    """``k``, ``v`` with zeros at masked keys: a key that takes no part then cannot turn a score
    or an output NaN (a NaN in a padding row times a zero weight is still NaN)."""
    if key_mask is None:
        return k, v
    keep = key_mask[:, None, :, None]
    return k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)


def semantic_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    any_layout: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the PyTorch path: ``(out [B, H, L, D] in q's dtype, lse [B, H, L])``.

    ``lse`` is the natural-log log-sum-exp of each row's admissible scores (-inf for an empty
    row), in ``promote_types(q.dtype, float32)``. On the CPU in fp32/fp16/bf16 the rows run
    through PyTorch's fused attention kernel (SDPA's), the padding and the bias as an additive
    mask built chunk by chunk; elsewhere through the flash recurrence below, in that dtype.
    The outputs' strides are those the op's fake promises, unless ``any_layout`` (a caller that
    traces nothing takes the fused kernel's as they come).
    """
    from spnn_fast.reference import attention_cpu as cpu

    if cpu._flash_cpu(q):
        return cpu._flash_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, any_layout)
    B, H, L, D = q.shape
    acc = _acc_dtype(q.dtype)
    k, v = _masked_keys(k, v, key_mask)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=acc, device=q.device)
    for r0, r1 in _chunks(B, H, L):
        s, _, _, nk = _chunk_scores(
            qa[:, :, r0:r1], ka, key_mask, timestamps, time_bias, causal, scale, r0, r1
        )
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp_(s.sub_(m.nan_to_num(neginf=0.0).unsqueeze(-1)))
        out[:, :, r0:r1] = torch.matmul(p, va[:, :, :nk])
        lse[:, :, r0:r1] = m
    return out, lse


def _add_bias_grad(dbias: torch.Tensor, ds: torch.Tensor, bucket: torch.Tensor) -> None:
    """``dbias[h, n] += sum of ds[b, h, i, j] over bucket[b, i, j] == n``, deterministically.

    Floating-point scatter-adds run in parallel in an order that changes from run to run, so the
    sum would differ in the last bits. On the CPU, ``bincount`` with weights is a serial loop
    (accumulating in float64); on CUDA, ``index_put_(accumulate=True)`` sorts the indices (stable)
    and sums each bucket in that order.
    """
    H, NB = dbias.shape
    if ds.device.type == "cpu":
        idx = bucket.unsqueeze(1) + NB * torch.arange(H, device=ds.device).view(1, H, 1, 1)
        hist = torch.bincount(idx.reshape(-1), weights=ds.reshape(-1), minlength=H * NB)
        dbias += hist.view(H, NB).to(dbias.dtype)
    else:
        dbias_t = torch.zeros((NB, H), dtype=dbias.dtype, device=dbias.device)
        values = ds.permute(0, 2, 3, 1).reshape(-1, H)
        dbias_t.index_put_((bucket.reshape(-1),), values, accumulate=True)
        dbias += dbias_t.t()


def semantic_attention_torch_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward of the PyTorch path: ``(dq, dk, dv, dtime_bias or None)``.

    Recomputes ``p = exp(s - lse)`` per chunk of query rows; every gradient is deterministic (see
    :func:`_add_bias_grad` for the time_bias one).
    """
    from spnn_fast.reference import attention_cpu as cpu

    if cpu._flash_cpu(q) and not bias_grad:
        return cpu._flash_bwd(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, causal,
                          scale)  # fmt: skip
    B, H, L, D = q.shape
    acc = _acc_dtype(q.dtype)
    k, v = _masked_keys(k, v, key_mask)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    go = grad_out.to(acc).contiguous()  # the gradient of out.sum() arrives with stride 0
    delta = (go * out.to(acc)).sum(-1)  # [B, H, L]
    dq = torch.empty((B, H, L, D), dtype=acc, device=q.device)
    dk = torch.zeros((B, H, L, D), dtype=acc, device=q.device)
    dv = torch.zeros((B, H, L, D), dtype=acc, device=q.device)
    dbias = None
    if bias_grad:
        dbias = torch.zeros(time_bias.shape, dtype=acc, device=q.device)
    for r0, r1 in _chunks(B, H, L):
        qc, goc = qa[:, :, r0:r1], go[:, :, r0:r1]
        s, _, bucket, nk = _chunk_scores(
            qc, ka, key_mask, timestamps, time_bias, causal, scale, r0, r1
        )
        m = lse[:, :, r0:r1].nan_to_num(neginf=0.0).unsqueeze(-1)
        p = torch.exp_(s.sub_(m))  # exactly 0 where the score was -inf
        dv[:, :, :nk] += torch.matmul(p.transpose(-1, -2), goc)
        ds = torch.matmul(goc, va[:, :, :nk].transpose(-1, -2))
        ds.sub_(delta[:, :, r0:r1].unsqueeze(-1)).mul_(p)
        dq[:, :, r0:r1] = torch.matmul(ds, ka[:, :, :nk]).mul_(scale)
        dk[:, :, :nk] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
        if bias_grad and bucket is None:  # the C++ helpers added the bias
            time_bias_cpp.add_bias_grad(dbias, ds, timestamps, r0)
        elif bias_grad:
            _add_bias_grad(dbias, ds, bucket)
    if dbias is not None:
        dbias = dbias.to(time_bias.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias
