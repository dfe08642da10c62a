"""Fused semantic attention: flash attention with a per-head time-interval bias, in Triton.

Math (checked against ``spnn_fast.reference.attention.semantic_attention_math`` in the tests)::

    q, k, v: [B, H, L, D]   timestamps t: [B, L] int64   time_bias: [H, NB]   mask: [B, L] bool
    s[b,h,i,j] = scale * <q[b,h,i], k[b,h,j]> + time_bias[h, min(NB - 1, bit_length(|t_i - t_j|))]
    admissible(i, j) = mask[b, j] and (j <= i if causal)
    out[b,h,i] = sum_j softmax_j(s over admissible j) * v[b,h,j]     (0 for a row with none)

Forward: one program per (b*h, block of query rows), online softmax over key tiles in fp32,
stores ``out`` and the natural-log ``lse`` (-inf for an empty row).

Backward: one program per (b, h). It computes delta = rowsum(out * grad_out) of its rows, then
loops over blocks of keys (dk, dv in registers) and, inside, over the query tiles that can see
them: the scores, p = exp(s - lse) and ds are formed once per tile pair (five matmuls). dq is
accumulated in an fp32 scratch row block that only this program touches, in a fixed order, and
scaled into ``dq`` at the end: no atomics. The time_bias gradient is this program's histogram of
ds over the buckets, written to a ``[B*H, NB]`` buffer that torch sums over b in a fixed order:
every gradient is deterministic, bit for bit. Per tile pair the histogram visits only the
buckets that the tile's timestamp ranges allow (from its query rows' and admissible keys' lowest
and highest timestamps), ``BUCKET_WINDOW`` buckets per pass, each a sum over the tile reduced in
the warp first. Masked-out scores are -inf in the forward and p = 0 in the backward, never NaN;
a row with no admissible key writes 0.

The bias is evaluated in the register layout of the score matmul, in one of two equivalent forms
chosen by the constexpr ``FAST_BIAS``:

* GPU form (``FAST_BIAS=True``, inline PTX: compiled, never interpreted). Bucket: the exponent
  field of ``float64(t_i - t_j)`` minus 1022 is ``bit_length(|g|)``, exactly while the gap is
  below 2**53 (a larger gap lands in the top bucket whenever NB <= 54); NB > 54 takes ``bfind``
  on all 64 bits. No predicates, no gathered load. Lookup: each lane of a warp holds entry
  ``min(lane, NB - 1)`` of the head's bias row (and ``lane + 32`` when NB > 32) and
  ``shfl.sync`` hands each score its bucket's entry, so the softmax never leaves the matmul's
  layout.
* Portable form (``FAST_BIAS=False``, what the launchers pick under ``TRITON_INTERPRET=1``):
  the exponent bits of ``float32(g)`` give ``bit_length(g)``, or one more when the conversion
  rounded up to a power of two, which the int64 comparison ``2**(e-1) > g`` undoes, and the
  bias is a gathered load.

Both are exact for gaps < 2**63. The GPU form is checked once per process and device, on the
first launch there: :func:`bias_form_check` runs both forms on a fixed tile of gaps (every power
of two and its neighbours, both signs, the ends of int64) and table entries, for each variant
(NB <= 32, NB > 32, NB > 54), and asks for exact equality (buckets are integers, bias values
copies). On any difference, or if the GPU form fails to compile, a warning says so once and the
launchers use the portable form on that device. The kernels read the bias table as fp32 in log2 units (the
launchers convert the [H, NB] table). L is a runtime argument that Triton does not specialize on
(``do_not_specialize``); block sizes depend only on ``min(64, next_pow2(L))``, D and the dtype
(:func:`fwd_config`, :func:`bwd_config`), so new lengths do not recompile. No fp16/bf16
configuration spills registers on sm_90 (``benchmarks/kernel_stats.py`` compiles them without a
GPU). D (head dim) must be 16, 32, 64 or 128. fp32 inputs use IEEE fp32 dots (no TF32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set), as exact as the fp32 reference.
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from spnn_fast.limits import ATTN_DTYPES, ATTN_HEAD_DIMS, MAX_TIME_BUCKETS

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "bwd_config",
    "bias_form_check",
    "bias_form_on",
    "bias_form_report",
    "fast_bias_form",
    "fwd_config",
    "gap_bucket_triton",
    "semantic_attention_bwd",
    "semantic_attention_fwd",
]

SUPPORTED_HEAD_DIMS = ATTN_HEAD_DIMS
SUPPORTED_DTYPES = ATTN_DTYPES

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ---------------------------------------------------------------------------------------------
# The time bias: bucket and lookup, GPU form (inline PTX) and portable form
# ---------------------------------------------------------------------------------------------

# min(NB - 1, bit_length(|d|)) for an int64 d and NB <= 54: the exponent field of float64(d)
# minus 1022 is bit_length(|d|), exactly while |d| < 2**53; a larger |d| may round up to the
# next power of two, which only moves a bucket >= 53 (the top one when NB <= 54). d = 0 has
# exponent 0 and gives bucket 0. No predicates: the clamps are integer min/max.
_BUCKET53_PTX = tl.constexpr(
    """{
.reg .f64 %sb_f;
.reg .b32 %sb_lo, %sb_hi;
cvt.rn.f64.s64 %sb_f, $1;
mov.b64 {%sb_lo, %sb_hi}, %sb_f;
shl.b32 %sb_hi, %sb_hi, 1;
shr.u32 %sb_hi, %sb_hi, 21;
sub.s32 %sb_hi, %sb_hi, 1022;
max.s32 %sb_hi, %sb_hi, 0;
min.s32 $0, %sb_hi, $2;
}"""
)

# min(NB - 1, bit_length(|d|)) for an int64 d and any NB <= 64, exactly: bfind on all 64 bits
# (abs(-2**63) is 2**63 unsigned, bfind 63; bfind(0) is 0xffffffff, which + 1 makes bucket 0).
_BUCKET64_PTX = tl.constexpr(
    """{
.reg .b64 %sb_g;
.reg .b32 %sb_e;
abs.s64 %sb_g, $1;
bfind.u64 %sb_e, %sb_g;
add.s32 %sb_e, %sb_e, 1;
min.u32 $0, %sb_e, $2;
}"""
)

# table[bucket] for bucket < 32: lane l loads table[min(l, NB - 1)] (the same address in every
# call of a thread, so ptxas keeps one load) and shfl.sync hands each score its bucket's entry.
_LOOKUP32_PTX = tl.constexpr(
    """{
.reg .b32 %sl_l;
.reg .b64 %sl_a;
.reg .f32 %sl_t;
mov.u32 %sl_l, %laneid;
min.u32 %sl_l, %sl_l, $3;
mad.wide.u32 %sl_a, %sl_l, 4, $2;
ld.global.nc.f32 %sl_t, [%sl_a];
shfl.sync.idx.b32 $0, %sl_t, $1, 0x1f, 0xffffffff;
}"""
)

# The same for bucket < 64: lane l holds table[min(l, NB - 1)] and table[min(l + 32, NB - 1)].
_LOOKUP64_PTX = tl.constexpr(
    """{
.reg .pred %sl_p;
.reg .b32 %sl_l, %sl_m;
.reg .b64 %sl_a;
.reg .f32 %sl_t0, %sl_t1, %sl_v0, %sl_v1;
mov.u32 %sl_l, %laneid;
add.u32 %sl_m, %sl_l, 32;
min.u32 %sl_l, %sl_l, $3;
min.u32 %sl_m, %sl_m, $3;
mad.wide.u32 %sl_a, %sl_l, 4, $2;
ld.global.nc.f32 %sl_t0, [%sl_a];
mad.wide.u32 %sl_a, %sl_m, 4, $2;
ld.global.nc.f32 %sl_t1, [%sl_a];
shfl.sync.idx.b32 %sl_v0, %sl_t0, $1, 0x1f, 0xffffffff;
shfl.sync.idx.b32 %sl_v1, %sl_t1, $1, 0x1f, 0xffffffff;
setp.gt.u32 %sl_p, $1, 31;
selp.f32 $0, %sl_v1, %sl_v0, %sl_p;
}"""
)


@triton.jit
def _gap_bucket(t_i, t_j, NB):
    """Portable form: ``min(NB - 1, bit_length(|t_i - t_j|))`` for int64 tensors (broadcast)."""
    g = tl.abs(t_i - t_j)
    bits = g.to(tl.float32).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 126  # bit_length(g), or +1 if float32(g) rounded up; g > 0
    e = tl.minimum(tl.maximum(e, 1), 63).to(tl.int64)
    low = tl.full(e.shape, 1, tl.int64) << (e - 1)
    e = e - (low > g).to(tl.int64)  # also maps g == 0 (e clamped to 1) to 0
    return tl.minimum(e, NB - 1).to(tl.int32)


@triton.jit
def _gap_bucket_fast(d, NB, INT64_BUCKET: tl.constexpr):
    """GPU form of :func:`_gap_bucket` on the difference ``d = t_i - t_j`` (int64):
    ``INT64_BUCKET`` for NB > 54, else the float64 exponent."""
    nbm1 = tl.full(d.shape, 0, tl.int32) + (NB - 1)
    if INT64_BUCKET:
        bucket = tl.inline_asm_elementwise(
            _BUCKET64_PTX, "=r,l,r", [d, nbm1], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        bucket = tl.inline_asm_elementwise(
            _BUCKET53_PTX, "=r,l,r", [d, nbm1], dtype=tl.int32, is_pure=True, pack=1
        )
    return bucket


@triton.jit
def _bias_lookup_fast(bucket, TAB, NB, WIDE: tl.constexpr):
    """GPU form of ``tl.load(TAB + bucket)`` (fp32 table of NB <= 64 entries) by warp shuffles."""
    nbm1 = tl.full(bucket.shape, 0, tl.int32) + (NB - 1)
    addr = tl.full(bucket.shape, 0, tl.int64) + TAB.to(tl.int64)
    args = [bucket, addr, nbm1]
    if WIDE:
        value = tl.inline_asm_elementwise(
            _LOOKUP64_PTX, "=f,r,l,r", args, dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        value = tl.inline_asm_elementwise(
            _LOOKUP32_PTX, "=f,r,l,r", args, dtype=tl.float32, is_pure=True, pack=1
        )
    return value


@triton.jit
def _tile_bias(
    t_i, t_j, TAB, NB, FAST_BIAS: tl.constexpr, BIAS_WIDE: tl.constexpr,
    BUCKET_INT64: tl.constexpr,
):  # fmt: skip
    """Buckets and bias (log2 units) of a [rows, keys] tile, in the layout of the scores.
    ``BIAS_WIDE``: NB > 32 (two table entries per lane); ``BUCKET_INT64``: NB > 54."""
    if FAST_BIAS:
        bucket = _gap_bucket_fast(t_i[:, None] - t_j[None, :], NB, BUCKET_INT64)
        bias = _bias_lookup_fast(bucket, TAB, NB, BIAS_WIDE)
    else:
        bucket = _gap_bucket(t_i[:, None], t_j[None, :], NB)
        bias = tl.load(TAB + bucket)
    return bucket, bias


@triton.jit
def _bias_probe_kernel(
    T_I, T_J, TAB, BUCKET, BIAS, NB, M: tl.constexpr, N: tl.constexpr,
    FAST_BIAS: tl.constexpr, BIAS_WIDE: tl.constexpr, BUCKET_INT64: tl.constexpr,
):  # fmt: skip
    """One [M, N] tile of buckets and bias values through :func:`_tile_bias`, in the layout the
    attention kernels use it in (the check of the GPU form against the portable one)."""
    offs_m, offs_n = tl.arange(0, M), tl.arange(0, N)
    t_i, t_j = tl.load(T_I + offs_m), tl.load(T_J + offs_n)
    bucket, bias = _tile_bias(t_i, t_j, TAB, NB, FAST_BIAS, BIAS_WIDE, BUCKET_INT64)
    at = offs_m[:, None] * N + offs_n[None, :]
    tl.store(BUCKET + at, bucket)
    tl.store(BIAS + at, bias)


@triton.jit
def _gap_bucket_kernel(
    G, OUT, N, NB, BLOCK: tl.constexpr, FAST_BIAS: tl.constexpr, BUCKET_INT64: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(G + offs, mask=ok, other=0)
    if FAST_BIAS:
        bucket = _gap_bucket_fast(g, NB, BUCKET_INT64)
    else:
        bucket = _gap_bucket(g, tl.zeros_like(g), NB)
    tl.store(OUT + offs, bucket.to(tl.int64), mask=ok)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _admissible(offs_m, offs_n, km, L, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    valid = (offs_m[:, None] < L) & (offs_n < L)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        valid = valid & (km != 0)[None, :]
    return valid


@triton.jit(do_not_specialize=["L"])
def _semantic_attention_fwd_kernel(
    Q, K, V, O, LSE, T, MASK, TAB, L, H, NB, qk_scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_BIAS: tl.constexpr,
    BIAS_WIDE: tl.constexpr, BUCKET_INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
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
    tab = TAB + h * NB
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, L)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_off = base + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        km = offs_n  # placeholder without a mask (compiled away)
        if HAS_MASK:
            km = tl.load(MASK + b * L + offs_n, mask=n_ok, other=0)
        if HAS_BIAS:
            t_j = tl.load(T + b * L + offs_n, mask=n_ok, other=0)
            _, bias = _tile_bias(t_i, t_j, tab, NB, FAST_BIAS, BIAS_WIDE, BUCKET_INT64)
            s += bias
        s = tl.where(_admissible(offs_m, offs_n, km, L, CAUSAL, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing admissible so far keep m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ok = n_ok
        if HAS_MASK:  # a masked key's value row is never read: a NaN there stays out
            v_ok = v_ok & (km != 0)
        v = tl.load(V + kv_off, mask=v_ok[:, None], other=0.0)
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


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bucket_histogram(hist, ds, bucket, b_lo, b_hi, offs_nb, W: tl.constexpr):
    """``hist[n] += sum of ds over the tile's scores in bucket n`` for ``b_lo <= n <= b_hi``
    (bounds that hold every admissible score's bucket), ``W`` buckets per pass; ds is 0 where
    inadmissible."""
    for n0 in range(b_lo, b_hi + 1, W):
        for w in tl.static_range(W):
            c = tl.sum(tl.where(bucket == n0 + w, ds, 0.0))  # all axes: one warp reduction
            hist += tl.where(offs_nb == n0 + w, c, 0.0)
    return hist


@triton.jit
def _bucket_bounds(tmin_i, tmax_i, tmin_j, tmax_j, NB):
    """(lowest, highest) bucket of |t_i - t_j| for t_i in [tmin_i, tmax_i], t_j in [tmin_j,
    tmax_j] (scalars); an empty key range (tmin_j > tmax_j) gives an empty bucket range."""
    gap_hi = tl.maximum(tmax_i - tmin_j, tmax_j - tmin_i)
    gap_lo = tl.maximum(tl.maximum(tmin_i - tmax_j, tmin_j - tmax_i), 0)
    b_lo = _gap_bucket(gap_lo, 0, NB)
    b_hi = tl.where(tmin_j <= tmax_j, _gap_bucket(gap_hi, 0, NB), -1)
    return b_lo, b_hi


@triton.jit(do_not_specialize=["L"])
def _semantic_attention_bwd_kernel(
    Q, K, V, O, DO, LSE, DELTA, TBOUND, DQ_ACC, DQ, DK, DV, DBIAS_PART, T, MASK, TAB, L, H, NB,
    scale,
    qk_scale, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NB_PAD: tl.constexpr, BUCKET_WINDOW: tl.constexpr, FAST_BIAS: tl.constexpr,
    BIAS_WIDE: tl.constexpr, BUCKET_INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, h): delta, then dk, dv per key block and dq through the fp32 scratch."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    base = bh * L * D
    offs_d = tl.arange(0, D)
    tab = TAB + h * NB
    big = 0x7FFFFFFFFFFFFFFF
    # delta[i] = <out[i], grad_out[i]> and, for the bias gradient, each query tile's range of
    # timestamps: read back by every key block's loop.
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        row_off = base + offs_m[:, None] * D + offs_d[None, :]
        o = tl.load(O + row_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + row_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, 1), mask=m_ok)
        if BIAS_GRAD:
            t_i = tl.load(T + b * L + offs_m, mask=m_ok, other=0)
            tb = TBOUND + (bh * tl.cdiv(L, BLOCK_M) + start_m // BLOCK_M) * 2
            tl.store(tb, tl.min(tl.where(m_ok, t_i, big), 0))
            tl.store(tb + 1, tl.max(tl.where(m_ok, t_i, -big - 1), 0))
    tl.debug_barrier()  # delta is read by other threads than those that wrote it
    offs_nb = tl.arange(0, NB_PAD)
    hist = tl.zeros([NB_PAD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_off = base + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=n_ok[:, None], other=0.0)
        km = offs_n  # placeholder without a mask (compiled away)
        if HAS_MASK:
            km = tl.load(MASK + b * L + offs_n, mask=n_ok, other=0)
        t_j = tl.zeros([BLOCK_N], tl.int64)
        tmin_j = 0
        tmax_j = 0
        if HAS_BIAS:
            t_j = tl.load(T + b * L + offs_n, mask=n_ok, other=0)
            if BIAS_GRAD:
                key_ok = n_ok
                if HAS_MASK:
                    key_ok = key_ok & (km != 0)
                tmin_j = tl.min(tl.where(key_ok, t_j, big), 0)
                tmax_j = tl.max(tl.where(key_ok, t_j, -big - 1), 0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        lo = 0
        if CAUSAL:
            lo = start_n  # query tiles above the key block see none of it
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < L
            row_off = base + offs_m[:, None] * D + offs_d[None, :]
            q = tl.load(Q + row_off, mask=m_ok[:, None], other=0.0)
            do = tl.load(DO + row_off, mask=m_ok[:, None], other=0.0)
            # lse in log2 units; 0 for an empty row (whose p is 0 anyway).
            lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            bucket = offs_n[None, :] * 0  # placeholder without a bias (compiled away)
            if HAS_BIAS:
                t_i = tl.load(T + b * L + offs_m, mask=m_ok, other=0)
                bucket, bias = _tile_bias(t_i, t_j, tab, NB, FAST_BIAS, BIAS_WIDE, BUCKET_INT64)
                s += bias
            valid = _admissible(offs_m, offs_n, km, L, CAUSAL, HAS_MASK)
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            # dq of these rows: the first key block writes the scratch, the later ones add to it.
            dq_acc = tl.load(DQ_ACC + row_off, mask=m_ok[:, None] & (start_n > 0), other=0.0)
            dq_acc = tl.dot(ds.to(k.dtype), k, acc=dq_acc, input_precision=DOT_PRECISION)
            tl.store(DQ_ACC + row_off, dq_acc, mask=m_ok[:, None])
            if BIAS_GRAD:
                tb = TBOUND + (bh * tl.cdiv(L, BLOCK_M) + start_m // BLOCK_M) * 2
                b_lo, b_hi = _bucket_bounds(tl.load(tb), tl.load(tb + 1), tmin_j, tmax_j, NB)
                hist = _bucket_histogram(hist, ds, bucket, b_lo, b_hi, offs_nb, BUCKET_WINDOW)
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])
        tl.debug_barrier()  # the next key block reads the dq scratch this one wrote
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        row_off = base + offs_m[:, None] * D + offs_d[None, :]
        dq = tl.load(DQ_ACC + row_off, mask=m_ok[:, None], other=0.0)
        tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])
    if BIAS_GRAD:
        tl.store(DBIAS_PART + bh * NB + offs_nb, hist, mask=offs_nb < NB)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block(L: int) -> int:
    """The block of rows a program owns: depends on L only through min(64, next_pow2(L))."""
    return min(64, max(16, triton.next_power_of_2(L)))


def fwd_config(L: int, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters of the forward kernel: 64-row blocks (fewer for a short L), 32-key
    tiles, two pipeline stages, 4 warps. fp32 (IEEE dots on the FMA units) takes 8 warps, and
    32-row blocks at D = 128. ``benchmarks/tune_gpu.py`` times the alternatives on a GPU."""
    block_m = _block(L)
    if dtype == torch.float32:
        block_m = min(block_m, 32 if D > 64 else 64)
        return dict(BLOCK_M=block_m, BLOCK_N=min(block_m, 32), num_warps=8, num_stages=2)
    return dict(BLOCK_M=block_m, BLOCK_N=min(block_m, 32), num_warps=4, num_stages=2)


def bwd_config(L: int, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters of the backward kernel: key blocks of BLOCK_N (dk, dv in registers)
    and query tiles of BLOCK_M. fp16/bf16 never spill registers on sm_90 (kernel_stats compiles
    every head dim); fp32's IEEE dots on the FMA units may spill at D >= 64."""
    block = _block(L)
    if dtype == torch.float32:
        if D <= 32:
            return dict(BLOCK_M=16, BLOCK_N=min(block, 32), num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)
    if D == 64:
        return dict(BLOCK_M=min(block, 32), BLOCK_N=block, num_warps=4, num_stages=2)
    return dict(BLOCK_M=16, BLOCK_N=block, num_warps=4 if D <= 32 else 8, num_stages=2)


# Buckets per pass of the bias-gradient histogram (see _bucket_histogram).
BUCKET_WINDOW = 2


def fast_bias_form() -> bool:
    """The GPU (inline PTX) form of the bias, except under the interpreter, which cannot run it."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") != "1"


# The variants of the bias code, by the bucket counts that pick them: (BIAS_WIDE, BUCKET_INT64).
_PROBE_NB = (32, 54, 64)


def _probe_tile(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Timestamps ``t_i [64]``, ``t_j [64]``: the differences t_i - t_j of the tile cover 0,
    every power of two up to 2**62 and its neighbours, both signs, and gaps up to 2**62 + 2**61
    with their low bits set (past float64's 53-bit mantissa)."""
    t_i = torch.tensor([0] + [2**m for m in range(63)], dtype=torch.int64)
    t_j = torch.tensor([0, 1, -1] + [2**n for n in range(60)] + [-(2**61)], dtype=torch.int64)
    return t_i.to(device), t_j.to(device)


def _probe(device: torch.device, nb: int, fast: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(buckets [64, 64], bias [64, 64])`` of one form on the probe tile, NB = ``nb``."""
    t_i, t_j = _probe_tile(device)
    table = torch.arange(nb, dtype=torch.float32, device=device) * 1.25 - 7.0
    bucket = torch.empty((64, 64), dtype=torch.int32, device=device)
    bias = torch.empty((64, 64), dtype=torch.float32, device=device)
    _bias_probe_kernel[(1,)](
        t_i, t_j, table, bucket, bias, nb, M=64, N=64, FAST_BIAS=fast,
        BIAS_WIDE=nb > 32, BUCKET_INT64=nb > 54,
    )  # fmt: skip
    return bucket, bias


def bias_form_check(device: torch.device) -> Dict[str, object]:
    """Runs the GPU form of the bias against the portable form on ``device`` (see the module
    docstring): ``{"form": "ptx" | "portable", "why": str}``. Not cached: see
    :func:`bias_form_on`, which the launchers call."""
    if not fast_bias_form():
        return {"form": "portable", "why": "the Triton interpreter cannot run inline PTX"}
    try:
        for nb in _PROBE_NB:
            fast, portable = _probe(device, nb, True), _probe(device, nb, False)
            for what, a, b in zip(("buckets", "bias values"), fast, portable):
                if not torch.equal(a, b):
                    bad = int((a != b).sum())
                    return {"form": "portable", "why": f"{bad} {what} of the probe differ at "
                            f"NB={nb}"}  # fmt: skip
    except Exception as e:  # a compile or launch failure of the inline PTX
        return {"form": "portable", "why": f"the GPU form failed: {type(e).__name__}: {e}"}
    return {"form": "ptx", "why": "equal to the portable form on the probe"}


@functools.cache
def _checked_form(device: torch.device) -> bool:
    result = bias_form_check(device)
    _BIAS_FORMS[str(device)] = result
    if result["form"] != "ptx" and fast_bias_form():
        warnings.warn(
            f"spnn_fast: the GPU form of the attention's time bias is not used on {device} "
            f"({result['why']}); the kernels take the portable form there",
            RuntimeWarning,
            stacklevel=3,
        )
    return result["form"] == "ptx"


# The outcome of each device's check, by device name (what benchmarks/gpu_check.sh reports).
_BIAS_FORMS: Dict[str, Dict[str, object]] = {}


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bias_form_on(device: torch.device) -> bool:
    """Whether the launchers take the GPU form on ``device``: checked on the first call per
    process and device, then remembered."""
    if not fast_bias_form():
        return False
    return _checked_form(_indexed(device))


def bias_form_report(device: torch.device) -> Dict[str, object]:
    """``{"form": "ptx" | "portable", "why": str}``: what the launchers take on ``device`` and
    why (the check runs here if no launch has run it yet)."""
    if not fast_bias_form():
        return bias_form_check(device)
    device = _indexed(device)
    _checked_form(device)
    return dict(_BIAS_FORMS[str(device)])


def _bias_form(nb: int, device: torch.device) -> dict:
    """The constexprs that pick the bias code for NB buckets (see :func:`_tile_bias`)."""
    return dict(FAST_BIAS=bias_form_on(device), BIAS_WIDE=nb > 32, BUCKET_INT64=nb > 54)


def _check(q, k, v, key_mask, timestamps, time_bias) -> None:
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
    if key_mask is not None and tuple(key_mask.shape) != (B, L):
        raise ValueError(f"key_mask must be [B, L] = [{B}, {L}]")
    if time_bias is not None:
        if timestamps is None or tuple(timestamps.shape) != (B, L):
            raise ValueError(f"timestamps must be [B, L] = [{B}, {L}] with a time_bias")
        if time_bias.dim() != 2 or time_bias.shape[0] != H:
            raise ValueError(f"time_bias must be [H, NB] with H={H}")
        if not 1 <= time_bias.shape[1] <= MAX_TIME_BUCKETS:
            raise ValueError(
                f"time_bias must have 1 to {MAX_TIME_BUCKETS} buckets, got {time_bias.shape[1]}"
            )


def _prepare(key_mask, timestamps, time_bias, placeholder):
    """(mask as uint8, int64 timestamps, fp32 bias table in log2 units, NB) for the kernels."""
    mask = placeholder if key_mask is None else key_mask.contiguous()
    if key_mask is not None:
        mask = mask.view(torch.uint8)
    if time_bias is None:
        return mask, placeholder, placeholder, 1
    ts = timestamps.to(torch.int64).contiguous()
    table = (time_bias.to(torch.float32) * LOG2E).contiguous()
    return mask, ts, table, time_bias.shape[1]


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
    key_mask: Optional[torch.Tensor],
    timestamps: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``(out [B, H, L, D] q.dtype, lse [B, H, L] fp32, natural log)``."""
    _check(q, k, v, key_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    mask, ts, table, nb = _prepare(key_mask, timestamps, time_bias, q)
    cfg = fwd_config(L, D, q.dtype)
    grid = (B * H, triton.cdiv(L, cfg["BLOCK_M"]))
    _semantic_attention_fwd_kernel[grid](
        q, k, v, out, lse, ts, mask, table, L, H, nb, float(scale) * LOG2E,
        HAS_MASK=key_mask is not None, HAS_BIAS=time_bias is not None,
        CAUSAL=bool(causal), D=D, DOT_PRECISION=_dot_precision(q.dtype),
        **_bias_form(nb, q.device), **cfg,
    )  # fmt: skip
    return out, lse


def semantic_attention_bwd(
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
    """Launch the backward: ``(dq, dk, dv, dtime_bias or None)``; every one deterministic."""
    _check(q, k, v, key_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    bias_grad = bool(bias_grad) and time_bias is not None
    # The gradient of out.sum() arrives expanded with stride 0: the kernels need it dense.
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    if key_mask is not None:
        # Masked keys' rows as zeros, so that a NaN there stays out of dq (ds is 0 there, but
        # 0 * NaN is not). One pass over k and v here costs less than masking their loads,
        # which slows the kernel's inner loop (kernel_stats counts it).
        keep = key_mask[:, None, :, None]
        k, v = k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)
    grad_out = grad_out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.zeros_like(time_bias) if bias_grad else None
    if q.numel() == 0:
        return dq, dk, dv, dbias
    mask, ts, table, nb = _prepare(key_mask, timestamps, time_bias, q)
    cfg = bwd_config(L, D, q.dtype)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dq_acc = torch.empty((B, H, L, D), dtype=torch.float32, device=q.device)
    part = tbound = q  # placeholders, never touched without BIAS_GRAD
    if bias_grad:
        part = torch.empty((B * H, nb), dtype=torch.float32, device=q.device)
        tiles = triton.cdiv(L, cfg["BLOCK_M"])
        tbound = torch.empty((B * H, tiles, 2), dtype=torch.int64, device=q.device)
    _semantic_attention_bwd_kernel[(B * H,)](
        q, k, v, out, grad_out, lse, delta, tbound, dq_acc, dq, dk, dv, part, ts, mask, table,
        L, H, nb, float(scale), float(scale) * LOG2E,
        HAS_MASK=key_mask is not None, HAS_BIAS=time_bias is not None,
        BIAS_GRAD=bias_grad, CAUSAL=bool(causal), D=D, NB_PAD=nb_pad(nb),
        BUCKET_WINDOW=BUCKET_WINDOW, DOT_PRECISION=_dot_precision(q.dtype),
        **_bias_form(nb, q.device), **cfg,
    )  # fmt: skip
    if bias_grad:
        # Fixed-order reduction over b: bitwise the same result on every run.
        dbias = part.view(B, H, nb).sum(dim=0).to(time_bias.dtype)
    return dq, dk, dv, dbias


def gap_bucket_triton(
    gaps: torch.Tensor, num_buckets: int, fast: Optional[bool] = None
) -> torch.Tensor:
    """The kernels' bucket function applied to int64 gaps (exposed for tests); ``fast`` picks
    the GPU or the portable form (default: what the attention launchers pick here)."""
    if not 1 <= num_buckets <= MAX_TIME_BUCKETS:
        raise ValueError(f"num_buckets must be in [1, {MAX_TIME_BUCKETS}], got {num_buckets}")
    g = gaps.to(torch.int64).contiguous().view(-1)
    out = torch.empty_like(g)
    if g.numel():
        block = 256
        fast = bias_form_on(g.device) if fast is None else bool(fast)
        _gap_bucket_kernel[(triton.cdiv(g.numel(), block),)](
            g, out, g.numel(), num_buckets, BLOCK=block, FAST_BIAS=fast,
            BUCKET_INT64=num_buckets > 54,
        )  # fmt: skip
    return out.view(gaps.shape)
