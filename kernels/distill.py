"""Fused linear distillation + cross-entropy loss over an item catalogue (Triton).

Math (per row n with target y_n != ignore_index; z_s = hs @ Ws.T, z_t = ht @ Wt.T, never formed)::

    loss_n = (1 - alpha) * (lse(z_s) - z_s[y_n])
           + alpha * T^2 * (E_{p_t}[z_t/T - z_s/T] - lse(z_t/T) + lse(z_s/T)),  p_t = softmax(z_t/T)
    dloss_n/dhs_n = (1 - alpha) * (softmax(z_s) @ Ws - Ws[y_n])
                  + alpha * T * (softmax(z_s/T) @ Ws - softmax(z_t/T) @ Ws)

Shapes: hs [N, Ds], Ws [V, Ds], ht [N, Dt], Wt [V, Dt] (one float dtype), y [N] int64;
Ds, Dt <= 256 (padded to a power of two >= 16 in registers). N and V are runtime ints.

The logits are formed twice per forward + backward, by two kernels:

* ``_distill_fwd_kernel``, flash-attention style with keys = values = the item table: a program
  owns a block of rows and streams a range of the catalogue in tiles; per tile it forms the
  logits with ``tl.dot`` and keeps, for each softmax it needs (z_s, z_s/T, z_t/T), an online
  (max, sum of exp) pair and the exp-weighted sum of the Ws rows (one more ``tl.dot``), plus the
  rescaled sum of p_t (z_t - z_s)/T. At the end: the row loss, the three log-sum-exps, and
  dloss_n/dhs_n (fp32, [N, Ds]); the backward only scales it by the incoming gradient. The
  target logit is one row dot product, outside the loop. When the row blocks alone cannot fill
  the GPU, the catalogue is split into ranges, one program per (row block, range), and
  ``_distill_merge_kernel`` combines the ranges' partial sums in a fixed order (a workspace of
  ``splits x N`` rows, independent of V).
* ``_distill_bwd_items_kernel``: a program owns a block of items and streams the rows: the same
  logits, dz = g_n [(1-alpha)(softmax(z_s) - onehot(y)) + alpha T (softmax(z_s/T) - softmax(z_t/T))]
  from the saved log-sum-exps, and d_Ws += dz.T @ hs. Each program owns its output rows:
  deterministic, no atomics.

No N x V buffer of any dtype exists; accumulation is fp32, exponentials in base 2. fp32 inputs
use "tf32x3" dots (about fp32 accuracy on tensor cores; "tf32" where torch allows TF32 matmuls).
Tile shapes depend on Ds, Dt, the dtype and the GPU's size only (:func:`fwd_config`,
:func:`items_config`); ``benchmarks/kernel_stats.py`` compiles them for sm_90 without a GPU.
Checked against ``spnn_fast.reference.distill.distillation_loss_reference`` (float64) in
tests/test_distill.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from spnn_fast.limits import DISTILL_MAX_DIM

from . import _device

__all__ = ["MAX_DIM", "distill_bwd", "distill_fwd", "fwd_config", "items_config"]

MAX_DIM = DISTILL_MAX_DIM


@triton.jit
def _load_rows(PTR, idx, idx_ok, offs, D):
    """Rows ``idx`` (masked by ``idx_ok``) of a row-major ``[*, D]`` matrix at columns ``offs``;
    0 outside, so padded rows and columns add nothing to a dot product."""
    mask = idx_ok[:, None] & (offs[None, :] < D)
    return tl.load(PTR + idx[:, None] * D + offs[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(PTR, val, idx, idx_ok, offs, D):
    mask = idx_ok[:, None] & (offs[None, :] < D)
    tl.store(PTR + idx[:, None] * D + offs[None, :], val.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _load_targets(Y, rows, row_ok, ignore_index, HAS_TARGET: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_TARGET:
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index)
    else:
        y = tl.zeros([BLOCK_N], dtype=tl.int64)
    return y


@triton.jit
def _online(m, l, acc, z, w, PRECISION: tl.constexpr):
    """One tile of an online softmax over z (log2 units, -inf at masked columns): the new row
    max, sum of 2^(z - max) and sum of 2^(z - max) * (rows of w)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    scale = tl.exp2(m - m_new)
    p = tl.exp2(z - m_new[:, None])
    l = l * scale + tl.sum(p, 1)
    acc = acc * scale[:, None] + tl.dot(p.to(w.dtype), w, input_precision=PRECISION)
    return m_new, l, acc, p, scale


@triton.jit(do_not_specialize=["N", "V", "tiles_per_split"])
def _distill_fwd_kernel(
    HS, WS, HT, WT, Y, LOSS, LSE_S, LSE_ST, LSE_TT, DHS, STATS, ACC, N, V, DS, DT,
    tiles_per_split, inv_t, ce_w, kd_w, kd_gw, ignore_index,
    HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, HAS_TARGET: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
    ht = hs  # placeholder without a teacher (compiled away)
    if HAS_KD:
        ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_s = tl.zeros([BLOCK_N], tl.float32)
    acc_s = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    m_st = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_st = tl.zeros([BLOCK_N], tl.float32)
    acc_st = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    m_tt = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_tt = tl.zeros([BLOCK_N], tl.float32)
    acc_tt = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    kd = tl.zeros([BLOCK_N], tl.float32)  # sum of 2^(zt - m_tt) (zt - zs), log2 units
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ws = _load_rows(WS, cols, col_ok, offs_ds, DS)
        # Logits in log2 units; -inf at the columns past V (only the last tile has any) where
        # they enter a softmax.
        zs = tl.dot(hs, tl.trans(ws), input_precision=PRECISION) * 1.4426950408889634
        if HAS_CE:
            zs_m = tl.where(col_ok[None, :], zs, neg_inf)
            m_s, l_s, acc_s, _, _ = _online(m_s, l_s, acc_s, zs_m, ws, PRECISION)
        if HAS_KD:
            wt = _load_rows(WT, cols, col_ok, offs_dt, DT)
            zt = tl.dot(ht, tl.trans(wt), input_precision=PRECISION) * (1.4426950408889634 * inv_t)
            zst = zs * inv_t
            zst_m = tl.where(col_ok[None, :], zst, neg_inf)
            m_st, l_st, acc_st, _, _ = _online(m_st, l_st, acc_st, zst_m, ws, PRECISION)
            zt_m = tl.where(col_ok[None, :], zt, neg_inf)
            m_tt, l_tt, acc_tt, p_t, scale = _online(m_tt, l_tt, acc_tt, zt_m, ws, PRECISION)
            kd = kd * scale + tl.sum(p_t * (zt - zst), 1)  # p_t is 0 past V
    if SPLIT:
        # This range's partial sums, combined by _distill_merge_kernel in a fixed order.
        _store_partials(
            STATS, ACC, split, rows, row_ok, offs_ds, N, m_s, l_s, acc_s, m_st, l_st, acc_st,
            m_tt, l_tt, acc_tt, kd, HAS_CE, HAS_KD, BLOCK_DS,
        )  # fmt: skip
    else:
        _finish_rows(
            HS, WS, Y, LOSS, LSE_S, LSE_ST, LSE_TT, DHS, rows, row_ok, hs, m_s, l_s, acc_s,
            m_st, l_st, acc_st, m_tt, l_tt, acc_tt, kd, DS, ce_w, kd_w, kd_gw, ignore_index,
            HAS_CE, HAS_KD, HAS_TARGET, BLOCK_N, BLOCK_DS,
        )  # fmt: skip


@triton.jit
def _store_partials(
    STATS, ACC, split, rows, row_ok, offs_ds, N, m_s, l_s, acc_s, m_st, l_st, acc_st, m_tt, l_tt,
    acc_tt, kd, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, BLOCK_DS: tl.constexpr,
):  # fmt: skip
    """Partial sums of one catalogue range: STATS [splits, 7, N], ACC [splits, 3, N, BLOCK_DS]
    (the student's softmax first, then z_s/T, then z_t/T; what the call does not need is left)."""
    st = STATS + split * 7 * N + rows
    acc_rows = split * 3 * N + rows
    if HAS_CE:
        tl.store(st, m_s, mask=row_ok)
        tl.store(st + N, l_s, mask=row_ok)
        _store_rows(ACC, acc_s, acc_rows, row_ok, offs_ds, BLOCK_DS)
    if HAS_KD:
        tl.store(st + 2 * N, m_st, mask=row_ok)
        tl.store(st + 3 * N, l_st, mask=row_ok)
        tl.store(st + 4 * N, m_tt, mask=row_ok)
        tl.store(st + 5 * N, l_tt, mask=row_ok)
        tl.store(st + 6 * N, kd, mask=row_ok)
        _store_rows(ACC, acc_st, acc_rows + N, row_ok, offs_ds, BLOCK_DS)
        _store_rows(ACC, acc_tt, acc_rows + 2 * N, row_ok, offs_ds, BLOCK_DS)


@triton.jit
def _finish_rows(
    HS, WS, Y, LOSS, LSE_S, LSE_ST, LSE_TT, DHS, rows, row_ok, hs, m_s, l_s, acc_s, m_st, l_st,
    acc_st, m_tt, l_tt, acc_tt, kd, DS, ce_w, kd_w, kd_gw, ignore_index,
    HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, HAS_TARGET: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):  # fmt: skip
    """Row losses, natural-log log-sum-exps and dloss/dhs from the merged sums (log2 units)."""
    offs_ds = tl.arange(0, BLOCK_DS)
    y = _load_targets(Y, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N)
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_st = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_hs = tl.zeros([BLOCK_N, BLOCK_DS], dtype=tl.float32)
    if HAS_CE:
        lse_s = (m_s + tl.log2(l_s)) * 0.6931471805599453
        y_ok = row_ok & (y >= 0)  # ignored rows hold ignore_index (any value)
        if HAS_TARGET:
            y_ok = y_ok & (y != ignore_index)
        w_y = _load_rows(WS, y, y_ok, offs_ds, DS).to(tl.float32)
        z_y = tl.sum(hs.to(tl.float32) * w_y, 1)  # the target logit: one row dot product
        loss += ce_w * (lse_s - z_y)
        d_hs += ce_w * (acc_s / l_s[:, None] - w_y)
    if HAS_KD:
        lse_st = (m_st + tl.log2(l_st)) * 0.6931471805599453
        lse_tt = (m_tt + tl.log2(l_tt)) * 0.6931471805599453
        loss += kd_w * ((kd / l_tt) * 0.6931471805599453 - lse_tt + lse_st)
        d_hs += kd_gw * (acc_st / l_st[:, None] - acc_tt / l_tt[:, None])
    if HAS_TARGET:
        counted = y != ignore_index
        loss = tl.where(counted, loss, 0.0)
        d_hs = tl.where(counted[:, None], d_hs, 0.0)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE_S + rows, lse_s, mask=row_ok)
    tl.store(LSE_ST + rows, lse_st, mask=row_ok)
    tl.store(LSE_TT + rows, lse_tt, mask=row_ok)
    _store_rows(DHS, d_hs, rows, row_ok, offs_ds, DS)


@triton.jit
def _merge(m, l, acc, m_p, l_p, acc_p):
    """Combine two partial (max, sum, weighted sum) triples of one softmax (log2 units)."""
    m_new = tl.maximum(m, m_p)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: keep 0, not NaN
    a = tl.exp2(m - m_safe)
    b = tl.exp2(m_p - m_safe)
    return m_new, l * a + l_p * b, acc * a[:, None] + acc_p * b[:, None], a, b


@triton.jit(do_not_specialize=["N"])
def _distill_merge_kernel(
    HS, WS, Y, LOSS, LSE_S, LSE_ST, LSE_TT, DHS, STATS, ACC, N, DS, splits, ce_w, kd_w, kd_gw,
    ignore_index, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr,
):  # fmt: skip
    """The catalogue ranges' partial sums, combined in range order, then the rows' results."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_ds = tl.arange(0, BLOCK_DS)
    hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_s = tl.zeros([BLOCK_N], tl.float32)
    acc_s = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    m_st = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_st = tl.zeros([BLOCK_N], tl.float32)
    acc_st = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    m_tt = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_tt = tl.zeros([BLOCK_N], tl.float32)
    acc_tt = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    kd = tl.zeros([BLOCK_N], tl.float32)
    for split in range(0, splits):
        st = STATS + split * 7 * N + rows
        acc_rows = split * 3 * N + rows
        if HAS_CE:
            acc_p = _load_rows(ACC, acc_rows, row_ok, offs_ds, BLOCK_DS)
            p_m = tl.load(st, mask=row_ok, other=neg_inf)
            p_l = tl.load(st + N, mask=row_ok, other=0.0)
            m_s, l_s, acc_s, _, _ = _merge(m_s, l_s, acc_s, p_m, p_l, acc_p)
        if HAS_KD:
            acc_p = _load_rows(ACC, acc_rows + N, row_ok, offs_ds, BLOCK_DS)
            p_m = tl.load(st + 2 * N, mask=row_ok, other=neg_inf)
            p_l = tl.load(st + 3 * N, mask=row_ok, other=0.0)
            m_st, l_st, acc_st, _, _ = _merge(m_st, l_st, acc_st, p_m, p_l, acc_p)
            acc_p = _load_rows(ACC, acc_rows + 2 * N, row_ok, offs_ds, BLOCK_DS)
            p_m = tl.load(st + 4 * N, mask=row_ok, other=neg_inf)
            p_l = tl.load(st + 5 * N, mask=row_ok, other=0.0)
            p_kd = tl.load(st + 6 * N, mask=row_ok, other=0.0)
            m_tt, l_tt, acc_tt, a, b = _merge(m_tt, l_tt, acc_tt, p_m, p_l, acc_p)
            kd = kd * a + p_kd * b
    _finish_rows(
        HS, WS, Y, LOSS, LSE_S, LSE_ST, LSE_TT, DHS, rows, row_ok, hs, m_s, l_s, acc_s,
        m_st, l_st, acc_st, m_tt, l_tt, acc_tt, kd, DS, ce_w, kd_w, kd_gw, ignore_index,
        HAS_CE, HAS_KD, HAS_TARGET, BLOCK_N, BLOCK_DS,
    )  # fmt: skip


@triton.jit(do_not_specialize=["N", "V"])
def _distill_bwd_items_kernel(
    G, HS, WS, HT, WT, Y, LSE_S, LSE_ST, LSE_TT, DWS, GMAX, N, V, DS, DT, inv_t, ce_w, kd_gw,
    ignore_index, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """d_Ws of a block of items: stream the rows, recompute dz from the saved log-sum-exps."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    ws = _load_rows(WS, cols, col_ok, offs_ds, DS)
    wt = ws  # placeholder without a teacher (compiled away)
    if HAS_KD:
        wt = _load_rows(WT, cols, col_ok, offs_dt, DT)
    inv_gmax = 1.0 / tl.load(GMAX)
    d_ws = tl.zeros([BLOCK_V, BLOCK_DS], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
        # Rows scaled by g_n / max|g| (in [-1, 1], 0 at ignored and padded rows) so that fp16
        # operands keep their range; max|g| is applied once at the end.
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        y = _load_targets(Y, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N)
        if HAS_TARGET:
            g = tl.where(y != ignore_index, g, 0.0)
        hs_g = (hs.to(tl.float32) * (g * inv_gmax)[:, None]).to(hs.dtype)
        zs = tl.dot(hs, tl.trans(ws), input_precision=PRECISION) * 1.4426950408889634
        dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if HAS_CE:
            lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            onehot = cols[None, :] == y[:, None]
            dz += ce_w * (tl.exp2(zs - lse_s[:, None]) - tl.where(onehot, 1.0, 0.0))
        if HAS_KD:
            ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
            zt = tl.dot(ht, tl.trans(wt), input_precision=PRECISION) * (1.4426950408889634 * inv_t)
            lse_st = tl.load(LSE_ST + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            lse_tt = tl.load(LSE_TT + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            dz += kd_gw * (tl.exp2(zs * inv_t - lse_st[:, None]) - tl.exp2(zt - lse_tt[:, None]))
        d_ws += tl.dot(tl.trans(dz.to(hs.dtype)), hs_g, input_precision=PRECISION)
    d_ws = d_ws * tl.load(GMAX)
    _store_rows(DWS, d_ws, cols, col_ok, offs_ds, DS)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def fwd_config(block_ds: int, block_dt: int, has_ce: bool, has_kd: bool, elem: int) -> dict:
    """Tiles of the forward: 64 rows per program (fewer when the [rows, Ds] fp32 sums it keeps,
    one per softmax, are wide) and catalogue tiles of 64, or 32 with the teacher (two more
    softmaxes per tile) or wide rows. No fp16/bf16 variant spills registers on sm_90; fp32 rows
    of 128 features and more do (their operands alone fill the registers)."""
    sums = int(has_ce) + 2 * int(has_kd)
    block_n = 64
    while block_n > 16 and sums * block_n * block_ds > 3 * 64 * 64:
        block_n //= 2
    wide = max(block_ds, block_dt if has_kd else 0) * elem > 256
    block_v = 32 if has_kd or wide else 64
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, num_warps=8 if wide else 4, num_stages=2)


def items_config(block_ds: int, block_dt: int, has_kd: bool, elem: int) -> dict:
    """Tiles of the d_items kernel: items per program (their fp32 d_Ws in registers) and rows
    per step, narrower for wide rows so that no fp16/bf16 variant spills registers on sm_90 and
    the staged operands fit its shared memory."""
    width = max(block_ds, block_dt if has_kd else 0) * elem
    if width <= 128:
        return dict(BLOCK_N=32, BLOCK_V=128, num_warps=8, num_stages=2)
    if width <= 256:
        return dict(BLOCK_N=32, BLOCK_V=64, num_warps=8, num_stages=2)
    if width <= 512:
        return dict(BLOCK_N=16, BLOCK_V=64, num_warps=8, num_stages=2)
    return dict(BLOCK_N=16, BLOCK_V=32, num_warps=4, num_stages=2)


def _merge_block_n(block_ds: int) -> int:
    """Rows per program of the merge, which holds three [rows, Ds] fp32 sums and a partial."""
    return 64 if block_ds <= 32 else (32 if block_ds <= 64 else 16)


def _splits(n: int, v: int, block_n: int, block_v: int, device: torch.device) -> int:
    """Catalogue ranges per row block: enough programs for two per SM (row blocks alone leave
    most of a GPU idle at N = 4096), at most 8 and at most the catalogue's tiles."""
    sms = _device.multiprocessor_count(device)
    if sms is None:
        return 1
    row_blocks = triton.cdiv(n, block_n)
    return max(1, min(8, triton.cdiv(2 * sms, row_blocks), triton.cdiv(v, block_v)))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 inputs (half inputs ignore it). TF32 where PyTorch allows it for
    its own matmuls; otherwise "tf32x3" (three TF32 products, about fp32 accuracy, on tensor
    cores): "ieee" lowers to FMA loops that spill registers heavily at these tile sizes."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _prepare(hs, ws, ht, wt, y, alpha):
    """Checks, contiguous operands ``(hs, ws, ht, wt, y)`` and the constexprs the kernels share."""
    has_ce, has_kd = alpha < 1, alpha > 0
    if hs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton distillation kernels take fp32/fp16/bf16, got {hs.dtype}")
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht)):
        if t is not None and t.shape[1] > MAX_DIM:
            raise ValueError(
                f"{name} has {t.shape[1]} features; the Triton kernels take <= {MAX_DIM}"
            )
    if has_kd and (ht is None or wt is None):
        raise ValueError(f"alpha={alpha} > 0 needs teacher_hidden and teacher_items")
    hs, ws = hs.contiguous(), ws.contiguous()
    if has_kd:
        ht, wt = ht.contiguous(), wt.contiguous()
    else:
        ht, wt = hs, ws  # never read: HAS_KD compiles the teacher away
    y_arg = y.contiguous() if y is not None else hs
    meta = dict(
        HAS_CE=has_ce, HAS_KD=has_kd, HAS_TARGET=y is not None, BLOCK_DS=_block_d(hs.shape[1]),
        BLOCK_DT=_block_d(ht.shape[1]), PRECISION=_precision(hs.dtype),
    )  # fmt: skip
    return (hs, ws, ht, wt, y_arg), meta


def distill_fwd(
    student_hidden: torch.Tensor,
    student_items: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_items: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    block: Optional[Tuple[int, int]] = None,
    splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses [N], statistics (lse_s, lse_sT, lse_tT) [N] and dloss_n/dhs_n [N, Ds], all
    fp32 (0 at ignored rows).

    ``block=(BLOCK_N, BLOCK_V)`` overrides the tile shape and ``splits`` the number of catalogue
    ranges (tests use them to cover tile edges and the merge).
    """
    (hs, ws, ht, wt, y), meta = _prepare(
        student_hidden, student_items, teacher_hidden, teacher_items, target, alpha
    )
    n, v = hs.shape[0], ws.shape[0]
    dev = hs.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4)]
    d_hs = torch.empty((n, hs.shape[1]), dtype=torch.float32, device=dev)
    if n == 0:
        return (*out, d_hs)
    cfg = fwd_config(meta["BLOCK_DS"], meta["BLOCK_DT"], meta["HAS_CE"], meta["HAS_KD"],
                     hs.element_size())  # fmt: skip
    if block is not None:
        cfg.update(BLOCK_N=block[0], BLOCK_V=block[1])
    if splits is None:
        splits = _splits(n, v, cfg["BLOCK_N"], cfg["BLOCK_V"], dev)
    tiles = triton.cdiv(v, cfg["BLOCK_V"])
    splits = max(1, min(int(splits), tiles))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty range
    stats = acc = out[0]  # placeholders, never touched without SPLIT
    if splits > 1:
        stats = torch.empty((splits, 7, n), dtype=torch.float32, device=dev)
        acc = torch.empty((splits, 3, n, meta["BLOCK_DS"]), dtype=torch.float32, device=dev)
    weights = (1.0 - alpha, alpha * temperature**2, alpha * temperature)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    _distill_fwd_kernel[(row_blocks, splits)](
        hs, ws, ht, wt, y, *out, d_hs, stats, acc, n, v, hs.shape[1], ht.shape[1],
        tiles_per_split, 1.0 / temperature, *weights, ignore_index, SPLIT=splits > 1,
        **meta, **cfg,
    )  # fmt: skip
    if splits > 1:
        merge_n = _merge_block_n(meta["BLOCK_DS"])
        _distill_merge_kernel[(triton.cdiv(n, merge_n),)](
            hs, ws, y, *out, d_hs, stats, acc, n, hs.shape[1], splits, *weights, ignore_index,
            HAS_CE=meta["HAS_CE"], HAS_KD=meta["HAS_KD"], HAS_TARGET=meta["HAS_TARGET"],
            BLOCK_N=merge_n, BLOCK_DS=meta["BLOCK_DS"], num_warps=4,
        )  # fmt: skip
    return (*out, d_hs)


def distill_bwd(
    grad_rows: torch.Tensor,
    student_hidden: torch.Tensor,
    student_items: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_items: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    lse_s: torch.Tensor,
    lse_st: torch.Tensor,
    lse_tt: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    block: Optional[Tuple[int, int]] = None,
    d_hidden_rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d_student_hidden, d_student_items) for ``grad_rows`` [N] on the row losses.

    ``d_hidden_rows``: the forward's dloss_n/dhs_n, which makes d_student_hidden one product;
    without it the forward kernel runs again for it. ``block=(BLOCK_N, BLOCK_V)`` overrides the
    tile shape of both.
    """
    (hs, ws, ht, wt, y), meta = _prepare(
        student_hidden, student_items, teacher_hidden, teacher_items, target, alpha
    )
    n, v = hs.shape[0], ws.shape[0]
    d_ws = torch.empty_like(ws)
    if n == 0:
        return torch.empty_like(hs), d_ws.zero_()
    g = grad_rows.to(torch.float32).contiguous()  # may arrive expanded with stride 0
    if d_hidden_rows is None:
        d_hidden_rows = distill_fwd(
            student_hidden, student_items, teacher_hidden, teacher_items, target, temperature,
            alpha, ignore_index, block=block,
        )[4]  # fmt: skip
    # g_n scales whole rows after the sums, so fp16 never holds g * dz (underflow).
    d_hs = (d_hidden_rows * g[:, None]).to(hs.dtype)
    cfg = items_config(meta["BLOCK_DS"], meta["BLOCK_DT"], meta["HAS_KD"], hs.element_size())
    if block is not None:
        cfg.update(BLOCK_N=block[0], BLOCK_V=block[1])
    stats = [t.contiguous() for t in (lse_s, lse_st, lse_tt)]
    gmax = g.abs().amax().clamp_min(1e-30).reshape(1)  # on the device: no host sync
    _distill_bwd_items_kernel[(triton.cdiv(v, cfg["BLOCK_V"]),)](
        g, hs, ws, ht, wt, y, *stats, d_ws, gmax, n, v, hs.shape[1], ht.shape[1],
        1.0 / temperature, 1.0 - alpha, alpha * temperature, ignore_index, **meta, **cfg,
    )  # fmt: skip
    return d_hs, d_ws
