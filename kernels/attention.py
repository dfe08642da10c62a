"""Fused semantic attention: flash attention with a per-head time-interval bias, in Triton.

Math (checked against ``spnn_fast.reference.attention.semantic_attention_math`` in the tests)::

    q, k, v: [B, H, L, D]   timestamps t: [B, L] int64   time_bias: [H, NB]   mask: [B, L] bool
    s[b,h,i,j] = scale * <q[b,h,i], k[b,h,j]> + time_bias[h, min(NB - 1, bit_length(|t_i - t_j|))]
    admissible(i, j) = mask[b, j] and (j <= i if causal)
    out[b,h,i] = sum_j softmax_j(s over admissible j) * v[b,h,j]     (0 for a row with none)

Forward: one program per (b*h, block of query rows), online softmax over key tiles in fp32,
stores ``out`` and the natural-log ``lse`` (-inf for an empty row). Backward recomputes
``p = exp(s - lse)``; one program per (b*h, block index) computes dk, dv of that key block
(iterating over query tiles) and then dq of that query block (iterating over key tiles), so
nothing is accumulated across programs with atomics. The time_bias gradient is a per-program
histogram of ``ds`` over the buckets, written to a ``[B*H*blocks, NB]`` buffer and summed in a
fixed order by torch: every gradient is deterministic, bit for bit. Masked-out scores are -inf
in the forward and p = 0 in the backward, never NaN; a row with no admissible key writes 0.

Buckets are computed in the kernel from the timestamps (no ``[B, H, L, L]`` tensor exists): the
exponent bits of ``float32(g)`` give ``bit_length(g)``, or one more when the conversion rounded up
to a power of two, which the int64 comparison ``2**(e-1) > g`` undoes. Exact for gaps < 2**63.

L is a runtime argument that Triton does not specialize on (``do_not_specialize``); block sizes
depend only on ``min(64, next_pow2(L))``, D and the dtype (:func:`fwd_config`,
:func:`bwd_config`), so new lengths do not recompile. The configurations were chosen so that no
fp16/bf16 variant spills registers on sm90; the tests compile them to sm90 cubins even without a
GPU. D (head dim) must be 16, 32, 64 or 128. fp32 inputs use IEEE fp32 dots (no TF32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set), as exact as the fp32 reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from spnn_fast.limits import ATTN_DTYPES, ATTN_HEAD_DIMS

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "bwd_config",
    "fwd_config",
    "gap_bucket_triton",
    "semantic_attention_bwd",
    "semantic_attention_fwd",
]

SUPPORTED_HEAD_DIMS = ATTN_HEAD_DIMS
SUPPORTED_DTYPES = ATTN_DTYPES

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _gap_bucket(t_i, t_j, NB):
    """``min(NB - 1, bit_length(|t_i - t_j|))`` for int64 tensors (broadcast together)."""
    g = tl.abs(t_i - t_j)
    bits = g.to(tl.float32).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 126  # bit_length(g), or +1 if float32(g) rounded up; g > 0
    e = tl.minimum(tl.maximum(e, 1), 63).to(tl.int64)
    low = tl.full(e.shape, 1, tl.int64) << (e - 1)
    e = e - (low > g).to(tl.int64)  # also maps g == 0 (e clamped to 1) to 0
    return tl.minimum(e, NB - 1).to(tl.int32)


@triton.jit
def _gap_bucket_kernel(G, OUT, N, NB, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(G + offs, mask=ok, other=0)
    tl.store(OUT + offs, _gap_bucket(g, tl.zeros_like(g), NB).to(tl.int64), mask=ok)


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    t_i,
    T,
    MASK,
    BIAS,
    b,
    h,
    L,
    NB,
    qk_scale,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores in log2 units for a [BLOCK_M, BLOCK_N] tile, the admissible mask, the buckets."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    n_ok = offs_n < L
    valid = (offs_m[:, None] < L) & n_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        km = tl.load(MASK + b * L + offs_n, mask=n_ok, other=0)
        valid = valid & (km != 0)[None, :]
    bucket = offs_n[None, :] * 0  # placeholder when there is no bias (compiled away)
    if HAS_BIAS:
        t_j = tl.load(T + b * L + offs_n, mask=n_ok, other=0)
        bucket = _gap_bucket(t_i[:, None], t_j[None, :], NB)
        s += tl.load(BIAS + h * NB + bucket).to(tl.float32) * 1.4426950408889634
    return s, valid, bucket


@triton.jit(do_not_specialize=["L"])
def _semantic_attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    T,
    MASK,
    BIAS,
    L,
    H,
    NB,
    qk_scale,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    base = bh * L * D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < L
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    t_i = tl.zeros([BLOCK_M], tl.int64)
    if HAS_BIAS:
        t_i = tl.load(T + b * L + offs_m, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, L)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_off = base + offs_n[:, None] * D + offs_d[None, :]
        kv_ok = (offs_n < L)[:, None]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        s, valid, _ = _scores(
            q, k, offs_m, offs_n, t_i, T, MASK, BIAS, b, h, L, NB, qk_scale,
            HAS_MASK, HAS_BIAS, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing admissible so far keep m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + base + offs_m[:, None] * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None],
    )
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=["L"])
def _semantic_attention_bwd_preprocess_kernel(
    O, DO, DELTA, L, D: tl.constexpr, BLOCK_M: tl.constexpr
):
    """delta[b,h,i] = <out[b,h,i], grad_out[b,h,i]> (fp32)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ok = (offs_m < L)[:, None]
    off = bh * L * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _load_query_rows(
    Q, DO, LSE, DELTA, T, bh, b, offs_m, L,
    D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """What the backward reads of query rows ``offs_m``: q, grad_out, lse in log2 units (0 for an
    empty row, whose p is 0 anyway), delta and the timestamps."""
    m_ok = offs_m < L
    row_off = bh * L * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + row_off, mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + row_off, mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    t_i = tl.zeros([BLOCK], tl.int64)
    if HAS_BIAS:
        t_i = tl.load(T + b * L + offs_m, mask=m_ok, other=0)
    return q, do, lse, delta, t_i, row_off, m_ok


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, T, MASK, BIAS, bh, b, h, start, L, NB, scale, qk_scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_ITER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of the key block at ``start``: loop over the query tiles that can see it."""
    base = bh * L * D
    offs_d = tl.arange(0, D)
    offs_n = start + tl.arange(0, BLOCK)
    n_ok = (offs_n < L)[:, None]
    kv_off = base + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=n_ok, other=0.0)
    v = tl.load(V + kv_off, mask=n_ok, other=0.0)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = start  # query tiles before the key block see none of it
    for start_m in range(lo, L, BLOCK_ITER):
        offs_m = start_m + tl.arange(0, BLOCK_ITER)
        q, do, lse, delta, t_i, _, _ = _load_query_rows(
            Q, DO, LSE, DELTA, T, bh, b, offs_m, L, D, HAS_BIAS, BLOCK_ITER
        )
        s, valid, _ = _scores(
            q, k, offs_m, offs_n, t_i, T, MASK, BIAS, b, h, L, NB, qk_scale,
            HAS_MASK, HAS_BIAS, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, T, MASK, BIAS, DBIAS_ROW, bh, b, h, start, L, NB, scale,
    qk_scale, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ITER: tl.constexpr,
    NB_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of the query block at ``start``, and its histogram of ds over the time buckets."""
    base = bh * L * D
    offs_d = tl.arange(0, D)
    offs_m = start + tl.arange(0, BLOCK)
    q, do, lse, delta, t_i, row_off, m_ok = _load_query_rows(
        Q, DO, LSE, DELTA, T, bh, b, offs_m, L, D, HAS_BIAS, BLOCK
    )
    dq = tl.zeros([BLOCK, D], tl.float32)
    offs_nb = tl.arange(0, NB_PAD)
    hist = tl.zeros([NB_PAD], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(start + BLOCK, L)
    for start_n in range(0, hi, BLOCK_ITER):
        offs_n = start_n + tl.arange(0, BLOCK_ITER)
        n_ok = (offs_n < L)[:, None]
        kv_off = base + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=n_ok, other=0.0)
        v = tl.load(V + kv_off, mask=n_ok, other=0.0)
        s, valid, bucket = _scores(
            q, k, offs_m, offs_n, t_i, T, MASK, BIAS, b, h, L, NB, qk_scale,
            HAS_MASK, HAS_BIAS, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            # Histogram of ds over the buckets present in this tile (ds is 0 where inadmissible).
            b_lo = tl.min(tl.min(tl.where(valid, bucket, NB), 1), 0)
            b_hi = tl.max(tl.max(tl.where(valid, bucket, -1), 1), 0)
            for n in range(b_lo, b_hi + 1):
                c = tl.sum(tl.sum(tl.where(bucket == n, ds, 0.0), 1), 0)
                hist += tl.where(offs_nb == n, c, 0.0)
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])
    if BIAS_GRAD:
        tl.store(DBIAS_ROW + offs_nb, hist, mask=offs_nb < NB)


@triton.jit(do_not_specialize=["L"])
def _semantic_attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DBIAS_PART, T, MASK, BIAS, L, H, NB, num_blocks,
    scale, qk_scale, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ITER: tl.constexpr,
    NB_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b*h, blk): dk, dv of key block blk, then dq of query block blk (no atomics)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = blk * BLOCK
    _bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV, T, MASK, BIAS, bh, b, h, start, L, NB, scale, qk_scale,
        HAS_MASK, HAS_BIAS, CAUSAL, D, BLOCK, BLOCK_ITER, DOT_PRECISION,
    )  # fmt: skip
    _bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ, T, MASK, BIAS, DBIAS_PART + (bh * num_blocks + blk) * NB,
        bh, b, h, start, L, NB, scale, qk_scale, HAS_MASK, HAS_BIAS, BIAS_GRAD, CAUSAL, D,
        BLOCK, BLOCK_ITER, NB_PAD, DOT_PRECISION,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block(L: int) -> int:
    """The block of rows a program owns: depends on L only through min(64, next_pow2(L))."""
    return min(64, max(16, triton.next_power_of_2(L)))


def fwd_config(L: int, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters of the forward kernel (no fp16/bf16/fp32 variant spills on sm90).
    fp16/bf16 pipeline three stages: 0.69 vs 0.74 ms with two on an H200 (B=1024, H=4, L=200,
    D=64, bf16; ``benchmarks/tune_gpu.py``, where every candidate with 8 warps or with 64-wide key
    tiles or 128-row blocks was slower)."""
    block_m = _block(L)
    half = dtype != torch.float32
    num_warps = 8 if not half and block_m >= 64 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=min(block_m, 32), num_warps=num_warps,
                num_stages=3 if half else 2)  # fmt: skip


def bwd_config(L: int, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters of the backward kernel: a program owns a block of rows and iterates
    over tiles of BLOCK_ITER so that the int64 bucket arithmetic of a tile fits in registers.

    fp16/bf16: blocks of 32 rows, tiles of 32 (16 at D = 128), 4 warps. Measured on an H200 at
    B=1024, H=4, L=200, D=64, bf16 only (``benchmarks/tune_gpu.py``, cut after 26 candidates):
    3.47 ms against 5.29 ms for 64-row blocks with tiles of 32 and 8 warps; with 32-row blocks, 8
    warps were slower than 4 with every tile. Other D, L and fp16 follow the same rule unmeasured
    (the GPU tests check their results). fp32 (IEEE dots without tensor cores, not measured on a
    GPU): 64-row blocks, tiles of 16, 8 warps.
    """
    block = _block(L)
    if dtype != torch.float32:
        block = min(block, 32)
        return dict(BLOCK=block, BLOCK_ITER=min(block, 16 if D >= 128 else 32), num_warps=4,
                    num_stages=2)  # fmt: skip
    block_iter = min(block, 16)
    num_warps = 8 if block >= 64 else 4
    return dict(BLOCK=block, BLOCK_ITER=block_iter, num_warps=num_warps, num_stages=2)


def _check(q, k, v, key_padding_mask, timestamps, time_bias) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, H, L, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim D={D} (q of shape {tuple(q.shape)}) is not supported by the Triton "
            f"kernels; supported: {SUPPORTED_HEAD_DIMS}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, "
            f"{v.dtype}"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, L):
        raise ValueError(f"key_padding_mask must be [B, L] = [{B}, {L}]")
    if time_bias is not None:
        if timestamps is None or tuple(timestamps.shape) != (B, L):
            raise ValueError(f"timestamps must be [B, L] = [{B}, {L}] with a time_bias")
        if time_bias.dim() != 2 or time_bias.shape[0] != H:
            raise ValueError(f"time_bias must be [H, NB] with H={H}")


def _prepare(key_padding_mask, timestamps, time_bias, placeholder):
    mask = placeholder if key_padding_mask is None else key_padding_mask.contiguous()
    if key_padding_mask is not None:
        mask = mask.view(torch.uint8)
    if time_bias is None:
        return mask, placeholder, placeholder, 1
    ts = timestamps.to(torch.int64).contiguous()
    return mask, ts, time_bias.contiguous(), time_bias.shape[1]


def nb_pad(nb: int) -> int:
    return max(16, triton.next_power_of_2(nb))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul switch, so the kernel is as exact as the fp32 reference.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def semantic_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``(out [B, H, L, D] q.dtype, lse [B, H, L] fp32, natural log)``."""
    _check(q, k, v, key_padding_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    mask, ts, bias, nb = _prepare(key_padding_mask, timestamps, time_bias, q)
    cfg = fwd_config(L, D, q.dtype)
    grid = (B * H, triton.cdiv(L, cfg["BLOCK_M"]))
    _semantic_attention_fwd_kernel[grid](
        q, k, v, out, lse, ts, mask, bias, L, H, nb, float(scale) * LOG2E,
        HAS_MASK=key_padding_mask is not None, HAS_BIAS=time_bias is not None,
        CAUSAL=bool(causal), D=D, DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )  # fmt: skip
    return out, lse


def semantic_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Launch the backward: ``(dq, dk, dv, dtime_bias or None)``; every one deterministic."""
    _check(q, k, v, key_padding_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    bias_grad = bool(bias_grad) and time_bias is not None
    # The gradient of out.sum() arrives expanded with stride 0: the kernels need it dense.
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.zeros_like(time_bias) if bias_grad else None
    if q.numel() == 0:
        return dq, dk, dv, dbias
    mask, ts, bias, nb = _prepare(key_padding_mask, timestamps, time_bias, q)
    cfg = bwd_config(L, D, q.dtype)
    block = cfg["BLOCK"]
    num_blocks = triton.cdiv(L, block)
    grid = (B * H, num_blocks)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _semantic_attention_bwd_preprocess_kernel[grid](out, grad_out, delta, L, D=D, BLOCK_M=block)
    part = q  # placeholder, never read without BIAS_GRAD
    if bias_grad:
        part = torch.empty((B * H * num_blocks, nb), dtype=torch.float32, device=q.device)
    _semantic_attention_bwd_kernel[grid](
        q, k, v, grad_out, lse, delta, dq, dk, dv, part, ts, mask, bias,
        L, H, nb, num_blocks, float(scale), float(scale) * LOG2E,
        HAS_MASK=key_padding_mask is not None, HAS_BIAS=time_bias is not None,
        BIAS_GRAD=bias_grad, CAUSAL=bool(causal), D=D, NB_PAD=nb_pad(nb),
        DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )  # fmt: skip
    if bias_grad:
        # Fixed-order reduction over (b, block): bitwise the same result on every run.
        dbias = part.view(B, H, num_blocks, nb).sum(dim=(0, 2)).to(time_bias.dtype)
    return dq, dk, dv, dbias


def gap_bucket_triton(gaps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """The kernels' bucket function applied to int64 gaps >= 0 (exposed for tests)."""
    g = gaps.to(torch.int64).contiguous().view(-1)
    out = torch.empty_like(g)
    if g.numel():
        block = 256
        _gap_bucket_kernel[(triton.cdiv(g.numel(), block),)](
            g, out, g.numel(), num_buckets, BLOCK=block
        )
    return out.view(gaps.shape)
