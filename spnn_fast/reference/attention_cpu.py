"""The CPU side of the attention's PyTorch path (``backend="torch"`` on a CPU tensor):

* the rows run through PyTorch's fused CPU attention kernel (the one SDPA runs), the padding and
  the bias as an additive mask, built chunk by chunk by the C++ helpers
  (:mod:`spnn_fast.reference.time_bias_cpp`) where the extension loaded; the kernel's outputs
  and gradients are returned in its own layout (:func:`cpu_layout`);
* a time-bias gradient over short windows keeps the forward's probabilities
  (:func:`keeps_probs`, :func:`probs_fwd`, :func:`probs_bwd`) instead of recomputing the scores.

The definition and the generic recurrence (any device, float64) are in
:mod:`spnn_fast.reference.attention`, which dispatches here.
"""

from __future__ import annotations

from typing import Optional

import torch

from spnn_fast.reference import time_bias_cpp
from spnn_fast.reference.attention import (
    _acc_dtype,
    _add_bias_grad,
    _chunk_scores,
    _chunks,
    _masked_keys,
    _pair_buckets,
    admissible,
)

__all__ = ["PROBS_BUDGET", "cpu_layout", "keeps_probs", "probs_bwd", "probs_fwd"]


def cpu_layout(q: torch.Tensor, *shape: int) -> torch.Tensor:
    """An empty tensor of ``shape`` ([B, H, L] or [B, H, L, D]) laid out as ``[B, L, H, ...]``
    when the CPU torch path serves ``q`` (:func:`_flash_cpu`): the layout of PyTorch's fused CPU
    kernel's outputs, which the path returns without copying them (and in which a module's
    ``out.transpose(1, 2).reshape(B, L, d)`` is a view); else contiguous. The op's fake
    tensors take it from here too."""
    if not _flash_cpu(q):
        return q.new_empty(shape)
    B, H, L, *rest = shape
    return q.new_empty((B, L, H, *rest)).transpose(1, 2)


def _as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the strides of ``like`` (``t`` itself when they match)."""
    return t if t.stride() == like.stride() else like.copy_(t)


def _flash_cpu(q: torch.Tensor) -> bool:
    """Whether PyTorch's fused CPU attention kernel (the one SDPA runs on the CPU, which also
    returns the log-sum-exp) serves this call."""
    return (
        q.device.type == "cpu"
        and q.numel() > 0  # the kernel divides by the sizes: an empty call takes the recurrence
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _seen_rows(key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Bool ``[B, L]``: whether query row i has an admissible key (causal: a key up to i takes
    part; else any key does)."""
    if causal:
        return key_mask.cumsum(-1) > 0
    return key_mask.any(-1, keepdim=True).expand(key_mask.shape)


def _flash_masks(key_mask, timestamps, time_bias, causal, B, H, L, dtype, device):
    """``(r0, r1, keys, additive mask or None, is_causal, empty rows or None)`` per chunk of
    query rows (``keys``: how many keys the chunk sees; empty rows: bool ``[B, 1, rows]``, the
    rows without an admissible key) for the fused CPU kernel. Without a bias, one chunk: the
    padding as a broadcast ``[B, 1, 1, L]`` mask and causality as the kernel's own flag. With
    one, chunks of ``[B, H, rows, keys]`` masks holding the bias, the padding and causality."""
    neg = float("-inf")
    if time_bias is None:
        mask = empty = None
        if key_mask is not None:
            mask = torch.zeros((B, 1, 1, L), dtype=dtype, device=device)
            mask.masked_fill_(~key_mask[:, None, None, :], neg)
            empty = (~_seen_rows(key_mask, causal))[:, None, :]
        yield 0, L, L, mask, causal, empty
        return
    seen = None if key_mask is None else _seen_rows(key_mask, causal)
    cpp = time_bias_cpp.loaded() and device.type == "cpu"
    for r0, r1 in _chunks(B, H, L):
        nk = r1 if causal else L
        empty = None if seen is None else (~seen[:, r0:r1])[:, None, :]
        if cpp:
            mask = torch.empty((B, H, r1 - r0, nk), dtype=torch.float32, device=device)
            time_bias_cpp.bias_into(
                mask, key_mask, timestamps, time_bias, causal, r0, accumulate=False
            )
            yield r0, r1, nk, mask.to(dtype), False, empty
            continue
        bucket = _pair_buckets(timestamps[:, r0:r1], timestamps[:, :nk], time_bias.shape[1])
        mask = time_bias.to(dtype)[:, bucket].transpose(0, 1)
        allowed = admissible(L, key_mask, causal, device, rows=(r0, r1), keys=nk)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, neg)
        yield r0, r1, nk, mask, False, empty


def _all_finite(*ts: torch.Tensor) -> bool:
    """Whether every value is finite, from one sum per tensor (a read, no copy; an overflowing
    sum only sends the call down the safe path). A host sync: CPU paths only."""
    return all(bool(torch.isfinite(t.sum())) for t in ts)


def _prescaled(q, time_bias, causal, scale):
    """``(q, scale)`` to hand the fused kernel. Its causal flag (used without a bias) scales the
    masked scores too, so a scale <= 0 turns them NaN or +inf; such a scale goes into q instead
    (one pass over q, only then)."""
    if causal and time_bias is None and not scale > 0:
        return q * scale, 1.0
    return q, scale


def _flash_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale, any_layout=False):
    """A NaN or an infinity in a masked key or value turns the rows that see it NaN (a score
    NaN + -inf, a weight 0 times NaN): the output is checked (one pass, where checking k and v
    first took two) and only then computed again with the masked keys zeroed."""
    out, lse = _flash_fwd_once(q, k, v, key_mask, timestamps, time_bias, causal, scale,
                               any_layout)  # fmt: skip
    if key_mask is not None and not _all_finite(out):  # no mask: no key to keep out
        k, v = _masked_keys(k, v, key_mask)
        out, lse = _flash_fwd_once(q, k, v, key_mask, timestamps, time_bias, causal, scale,
                                   any_layout)  # fmt: skip
    return out, lse


def _flash_fwd_once(q, k, v, key_mask, timestamps, time_bias, causal, scale, any_layout):
    B, H, L, D = q.shape
    q, scale = _prescaled(q, time_bias, causal, scale)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    chunks = _flash_masks(key_mask, timestamps, time_bias, causal, B, H, L, q.dtype, q.device)
    out = lse = None
    for r0, r1, nk, mask, is_causal, empty in chunks:
        o, m = op(q[:, :, r0:r1], k[:, :, :nk], v[:, :, :nk], 0.0, is_causal, attn_mask=mask,
                  scale=scale)  # fmt: skip
        if empty is not None:  # the kernel gives an empty row lse 0; here it is -inf
            m = m.masked_fill_(empty.expand_as(m), float("-inf"))
        if r0 == 0 and r1 == L:  # one call holds every row: its outputs are the result
            if any_layout:  # (the kernel's output follows q's layout, which the fake cannot see)
                return o, m
            lse_like = cpu_layout(q, B, H, L).to(_acc_dtype(q.dtype))
            return _as_layout(o, cpu_layout(q, B, H, L, D)), _as_layout(m, lse_like)
        if out is None:  # in the kernel's layout, as the op's fake says
            out = cpu_layout(q, B, H, L, D)
            lse = cpu_layout(q, B, H, L).to(_acc_dtype(q.dtype))
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = m
    return out, lse


def _flash_bwd(grad_out, q, k, v, out, lse, key_mask, timestamps, time_bias, causal, scale):
    """dq, dk, dv through the fused CPU kernel's backward (no bias gradient)."""
    B, H, L, D = q.shape
    q_scale = scale
    q, scale = _prescaled(q, time_bias, causal, scale)
    q_scale = q_scale if scale != q_scale else None  # dq = q_scale * d(q * q_scale)
    finite = key_mask is None or _all_finite(k, v)
    if not finite:
        k, v = _masked_keys(k, v, key_mask)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    lse = lse.nan_to_num(neginf=0.0)  # the kernel's convention for an empty row
    go = grad_out  # any strides, as SDPA's own backward passes it (an expanded one: no copy)
    chunks = list(_flash_masks(key_mask, timestamps, time_bias, causal, B, H, L, q.dtype,
                               q.device))  # fmt: skip
    if len(chunks) == 1 and finite:
        # One call holds every row: its gradients are the result. A masked key's weights are
        # exactly 0 and its value finite, so its gradients are exactly 0.
        _, _, _, mask, is_causal, _ = chunks[0]
        gq, gk, gv = op(go, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        if q_scale is not None:
            gq = gq * q_scale
        return (*(_as_layout(g, cpu_layout(q, B, H, L, D)) for g in (gq, gk, gv)), None)
    dq = cpu_layout(q, B, H, L, D)  # the kernel's layout, as the op's fake says
    # dk, dv sum the chunks' shares: in fp32 (fp64 for fp64), cast once at the end
    dk, dv = (torch.zeros(q.shape, dtype=_acc_dtype(q.dtype), device=q.device) for _ in "kv")
    for r0, r1, nk, mask, is_causal, _ in chunks:
        gq, gk, gv = op(go[:, :, r0:r1], q[:, :, r0:r1], k[:, :, :nk], v[:, :, :nk],
                        out[:, :, r0:r1], lse[:, :, r0:r1], 0.0, is_causal, attn_mask=mask,
                        scale=scale)  # fmt: skip
        dq[:, :, r0:r1] = gq
        dk[:, :, :nk] += gk
        dv[:, :, :nk] += gv
    if key_mask is not None:  # masked keys take no part: no gradient reaches them
        keep = key_mask[:, None, :, None]
        dk, dv = dk.masked_fill(~keep, 0), dv.masked_fill(~keep, 0)
    if q_scale is not None:
        dq = dq * q_scale
    dk, dv = (_as_layout(g.to(q.dtype), cpu_layout(q, B, H, L, D)) for g in (dk, dv))
    return _as_layout(dq, cpu_layout(q, B, H, L, D)), dk, dv, None


# Bytes of [B, H, L, L] probabilities the CPU path may keep from the forward for the backward of a
# time-bias gradient: below it the backward reads them instead of recomputing the scores (at short
# lengths the recomputation costs more than the attention's own products).
PROBS_BUDGET = 64 * 2**20


# Without a bias, windows up to this length take the probabilities path (forward + backward,
# 2 threads: L = 30 1.2x-2.0x the fused kernel, L = 50 1.1x-1.25x, L = 64 1.25x; L = 100 0.77x):
# the kernel computes the scores in blocks sized for long rows, and at these lengths four plain
# products and one softmax beat it. A forward alone takes it while its scores stay in cache
# (PROBS_FORWARD_MAX entries: 256 x 2 x 50 x 50 scores 1.3x; 1024 x 4 x 50 x 50 0.6x).
PROBS_NO_BIAS_MAX_L = 64
PROBS_FORWARD_MAX = 2**21


def keeps_probs(q: torch.Tensor, time_bias: Optional[torch.Tensor], bias_grad: bool,
                grad: bool) -> bool:  # fmt: skip
    """Whether a call on the CPU runs :func:`probs_fwd` (and :func:`probs_bwd`), given whether
    its time bias wants a gradient (``bias_grad``) and whether it wants any (``grad``): when its
    probabilities fit :data:`PROBS_BUDGET` and, with a bias, it wants the bias's gradient or
    none (a forward: the bias then costs one pass over the scores, not a mask per chunk);
    without one, its windows are at most :data:`PROBS_NO_BIAS_MAX_L` long and it wants a
    gradient or its scores fit :data:`PROBS_FORWARD_MAX`."""
    B, H, L, _ = q.shape
    acc = torch.finfo(_acc_dtype(q.dtype)).bits // 8
    if time_bias is not None:
        wanted = bias_grad or not grad
    else:
        wanted = L <= PROBS_NO_BIAS_MAX_L and (grad or B * H * L * L <= PROBS_FORWARD_MAX)
    return (
        wanted and q.device.type == "cpu" and q.numel() > 0 and B * H * L * L * acc <= PROBS_BUDGET
    )


def _scores(qa, ka, key_mask, timestamps, time_bias, causal, scale):
    """``[B, H, L, L]`` scores with the bias, -inf where a key is not admissible."""
    return _chunk_scores(qa, ka, key_mask, timestamps, time_bias, causal, scale, 0, qa.shape[2])


def probs_fwd(q, k, v, key_mask, timestamps, time_bias, causal, scale):
    """``(out [B, H, L, D] in q's dtype, p [B, H, L, L] in the accumulation dtype)``: the
    definition over the whole score matrix, its probabilities kept (0 where a key is not
    admissible and in rows without any)."""
    acc = _acc_dtype(q.dtype)
    # k and v themselves, not the output as _flash_fwd does: the scores' -inf fill hides a
    # poisoned masked key here, whose NaN would still reach dq in the backward
    if key_mask is not None and not _all_finite(k, v):
        k, v = _masked_keys(k, v, key_mask)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    s, _, _, _ = _scores(qa, ka, key_mask, timestamps, time_bias, causal, scale)
    p = torch.softmax(s, dim=-1)  # one fused pass; a row of -inf only comes out NaN
    if key_mask is not None:
        empty = _empty_rows(key_mask, causal)
        if empty is not None:
            p.masked_fill_(empty[:, None, :, None], 0.0)
    return torch.matmul(p, va).to(q.dtype), p


def _empty_rows(key_mask: torch.Tensor, causal: bool) -> Optional[torch.Tensor]:
    """Bool ``[B, L]``: the query rows without an admissible key; None when there are none."""
    seen = _seen_rows(key_mask, causal)
    return None if bool(seen.all()) else ~seen


def probs_bwd(grad_out, q, k, v, out, p, key_mask, timestamps, time_bias, causal, scale,
              bias_grad):  # fmt: skip
    """``(dq, dk, dv, dtime_bias or None)`` from the kept probabilities ``p``: four products
    and the bias gradient's histogram of ``ds``."""
    acc = _acc_dtype(q.dtype)
    if key_mask is not None and not _all_finite(k, v):
        k, v = _masked_keys(k, v, key_mask)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    go = grad_out.to(acc)
    if 0 in go.stride():  # expanded (out.sum().backward()): the products would read it slowly
        go = go.contiguous()
    dv = torch.matmul(p.transpose(-1, -2), go)
    delta = (go * out.to(acc)).sum(dim=-1, keepdim=True)
    ds = torch.matmul(go, va.transpose(-1, -2)).sub_(delta).mul_(p)
    dq = torch.matmul(ds, ka).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    dbias = None
    if bias_grad:
        dbias = torch.zeros(time_bias.shape, dtype=acc, device=q.device)
        if time_bias_cpp.available(ds, timestamps):
            time_bias_cpp.add_bias_grad(dbias, ds, timestamps, 0)
        else:
            L = q.shape[2]
            _add_bias_grad(dbias, ds, _pair_buckets(timestamps, timestamps[:, :L], dbias.shape[1]))
        dbias = dbias.to(time_bias.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias
