"""Sampled softmax cross-entropy + logit distillation over each row's target and K shared
negatives (Triton).

Math (per row n with target y_n != ignore_index; candidates c_0 = y_n, c_k = neg_k)::

    s_nj = h_n . W[c_j] - log_q[c_j]          (-inf at a negative equal to y_n, with REMOVE_HITS)
    t_nj = ht_n . Wt[c_j] - log_q[c_j]        (the teacher, same candidates)
    loss_n = (1 - alpha) * (lse_j(s_nj) - s_n0)
           + alpha * T^2 * (E_{p_t}[t_n/T - s_n/T] - lse(t_n/T) + lse(s_n/T)),  p_t = softmax(t_n/T)
    ds_nj = (1 - alpha) * (softmax(s_n)_j - [j = 0]) + alpha * T * (softmax(s_n/T)_j - p_t,j)
    dloss_n/dh_n = sum_j ds_nj W[c_j]

Shapes: h [N, D], W [C, D], ht [N, Dt], Wt [C, Dt] (one float dtype), y [N] int64, neg [K] int64,
log_q [C] fp32 (optional); D, Dt <= 256 (padded to a power of two >= 16 in registers). N, K and
C are runtime ints. No [N, K] buffer of any dtype exists; accumulation is fp32, exponentials in
base 2.

Three kernels:

* ``_sampled_softmax_fwd_kernel``: a program owns a block of rows, starts each online softmax
  (of s, s/T and t/T) at the positive (max = its logit, sum = 1, weighted sum = W[y]) and
  streams the negatives in tiles, gathering their rows of W (and Wt) by id: per tile one
  ``tl.dot`` for the logits and one for the exp-weighted sum of the rows. At the end: the row
  loss, the three log-sum-exps, dloss_n/dh_n [N, D] and the positive's ds_n0 [N] (fp32).
* ``_sampled_softmax_bwd_kernel``: a program owns a tile of negative slots and streams the rows:
  the same logits, ds from the saved log-sum-exps, d_Wn[k] = sum_n g_n ds_nk h_n ([K, D] fp32,
  one row per slot, duplicates apart). Each program owns its output rows: no atomics.
* ``_scatter_rows_kernel``: W's gradient, the targets' rows g_n ds_n0 h_n and the negatives'
  d_Wn, summed per class without atomics: the class ids sorted (stable), one program per run of
  equal ids sums it in order and writes its class's row once. Deterministic, whatever the
  duplicates; classes that are no candidate get 0.

Tile shapes come from :func:`spnn_fast.kernels.distill.fwd_config` / ``items_config`` (the same
register budget: one to three [rows, D] fp32 sums, or [negatives, D] of d_Wn). Checked against
``spnn_fast.reference.sampled_softmax`` (float64) in tests/test_sampled_softmax.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from spnn_fast.limits import SAMPLED_MAX_DIM

from .distill import (
    _block_d,
    _load_rows,
    _online,
    _precision,
    _store_rows,
    fwd_config,
    items_config,
)

__all__ = ["MAX_DIM", "sampled_softmax_bwd", "sampled_softmax_fwd"]

MAX_DIM = SAMPLED_MAX_DIM
_LOG2E = tl.constexpr(1.4426950408889634)  # exponentials in base 2
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _positive(H, W, LQ, rows, row_ok, y_safe, counted, offs, D, HAS_LQ: tl.constexpr):
    """(h rows, W[y] rows, the corrected positive logit h . W[y] - log_q[y]) of a row block."""
    h = _load_rows(H, rows, row_ok, offs, D)
    w_y = _load_rows(W, y_safe, counted, offs, D)
    s0 = tl.sum(h.to(tl.float32) * w_y.to(tl.float32), 1)
    if HAS_LQ:
        s0 -= tl.load(LQ + y_safe, mask=counted, other=0.0)
    return h, w_y, s0


@triton.jit
def _negative_logits(h, wn, lq_n, PRECISION: tl.constexpr, HAS_LQ: tl.constexpr):
    z = tl.dot(h, tl.trans(wn), input_precision=PRECISION)
    if HAS_LQ:
        z -= lq_n[None, :]
    return z


@triton.jit(do_not_specialize=["N", "K"])
def _sampled_softmax_fwd_kernel(
    H, W, HT, WT, Y, NEG, LQ, LOSS, LSE_S, LSE_ST, LSE_TT, DH, DPOS, N, K, D, DT, inv_t, ce_w,
    kd_w, kd_gw, ignore_index, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr,
    HAS_LQ: tl.constexpr, REMOVE_HITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dt = tl.arange(0, BLOCK_DT)
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index)
    counted = row_ok & (y != ignore_index)
    y_safe = tl.where(counted, y, 0)
    h, w_y, s0 = _positive(H, W, LQ, rows, row_ok, y_safe, counted, offs_d, D, HAS_LQ)
    s0 = s0 * _LOG2E  # log2 units from here on
    w_y32 = w_y.to(tl.float32)
    one = tl.full([BLOCK_N], 1.0, tl.float32)
    # Every online softmax starts at the positive: max = its logit, sum = 1, rows = W[y].
    m_s, l_s, acc_s = s0, one, w_y32
    m_st, l_st, acc_st = s0 * inv_t, one, w_y32
    m_tt, l_tt, acc_tt = s0, one, w_y32
    kd = tl.zeros([BLOCK_N], tl.float32)
    ht = h  # placeholders without a teacher (compiled away)
    t0 = s0
    if HAS_KD:
        ht, wt_y, t0 = _positive(HT, WT, LQ, rows, row_ok, y_safe, counted, offs_dt, DT, HAS_LQ)
        t0 = t0 * (_LOG2E * inv_t)
        m_tt = t0
        kd = t0 - s0 * inv_t  # p_t's sum of (t - s)/T so far, relative to 2^m_tt
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        neg = tl.load(NEG + ks, mask=k_ok, other=0)
        lq_n = tl.zeros([BLOCK_K], tl.float32)
        if HAS_LQ:
            lq_n = tl.load(LQ + neg, mask=k_ok, other=0.0)
        keep = k_ok[None, :] & row_ok[:, None]
        if REMOVE_HITS:
            keep = keep & (neg[None, :] != y[:, None])
        wn = _load_rows(W, neg, k_ok, offs_d, D)
        zs = _negative_logits(h, wn, lq_n, PRECISION, HAS_LQ) * _LOG2E
        if HAS_CE:
            zs_m = tl.where(keep, zs, float("-inf"))
            m_s, l_s, acc_s, _, _ = _online(m_s, l_s, acc_s, zs_m, wn, PRECISION)
        if HAS_KD:
            wtn = _load_rows(WT, neg, k_ok, offs_dt, DT)
            zt = _negative_logits(ht, wtn, lq_n, PRECISION, HAS_LQ) * (_LOG2E * inv_t)
            zst = zs * inv_t
            zst_m = tl.where(keep, zst, float("-inf"))
            m_st, l_st, acc_st, _, _ = _online(m_st, l_st, acc_st, zst_m, wn, PRECISION)
            zt_m = tl.where(keep, zt, float("-inf"))
            m_tt, l_tt, acc_tt, p_t, scale = _online(m_tt, l_tt, acc_tt, zt_m, wn, PRECISION)
            kd = kd * scale + tl.sum(p_t * (zt - zst), 1)  # p_t is 0 where not kept
    loss = tl.zeros([BLOCK_N], tl.float32)
    lse_s = tl.zeros([BLOCK_N], tl.float32)
    lse_st = tl.zeros([BLOCK_N], tl.float32)
    lse_tt = tl.zeros([BLOCK_N], tl.float32)
    d_h = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    d_pos = tl.zeros([BLOCK_N], tl.float32)
    # W[y] again rather than held across the loop: one [rows, D] fp32 block fewer in registers.
    w_y32 = _load_rows(W, y_safe, counted, offs_d, D).to(tl.float32)
    if HAS_CE:
        lse_s = (m_s + tl.log2(l_s)) * _LN2
        loss += ce_w * (lse_s - s0 * _LN2)
        d_h += ce_w * (acc_s / l_s[:, None] - w_y32)
        d_pos += ce_w * (tl.exp2(s0 - m_s) / l_s - 1.0)
    if HAS_KD:
        lse_st = (m_st + tl.log2(l_st)) * _LN2
        lse_tt = (m_tt + tl.log2(l_tt)) * _LN2
        loss += kd_w * ((kd / l_tt) * _LN2 - lse_tt + lse_st)
        d_h += kd_gw * (acc_st / l_st[:, None] - acc_tt / l_tt[:, None])
        d_pos += kd_gw * (tl.exp2(s0 * inv_t - m_st) / l_st - tl.exp2(t0 - m_tt) / l_tt)
    loss = tl.where(counted, loss, 0.0)
    d_h = tl.where(counted[:, None], d_h, 0.0)
    d_pos = tl.where(counted, d_pos, 0.0)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE_S + rows, lse_s, mask=row_ok)
    tl.store(LSE_ST + rows, lse_st, mask=row_ok)
    tl.store(LSE_TT + rows, lse_tt, mask=row_ok)
    tl.store(DPOS + rows, d_pos, mask=row_ok)
    _store_rows(DH, d_h, rows, row_ok, offs_d, D)


@triton.jit(do_not_specialize=["N", "K"])
def _sampled_softmax_bwd_kernel(
    G, H, W, HT, WT, Y, NEG, LQ, LSE_S, LSE_ST, LSE_TT, DWN, GMAX, N, K, D, DT, inv_t, ce_w,
    kd_gw, ignore_index, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, HAS_LQ: tl.constexpr,
    REMOVE_HITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """d_Wn of a tile of negative slots: stream the rows, re-form ds from the log-sum-exps."""
    pid = tl.program_id(0).to(tl.int64)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    offs_d = tl.arange(0, BLOCK_D)
    offs_dt = tl.arange(0, BLOCK_DT)
    neg = tl.load(NEG + ks, mask=k_ok, other=0)
    lq_n = tl.zeros([BLOCK_K], tl.float32)
    if HAS_LQ:
        lq_n = tl.load(LQ + neg, mask=k_ok, other=0.0)
    wn = _load_rows(W, neg, k_ok, offs_d, D)
    wtn = wn  # placeholder without a teacher (compiled away)
    if HAS_KD:
        wtn = _load_rows(WT, neg, k_ok, offs_dt, DT)
    inv_gmax = 1.0 / tl.load(GMAX)
    d_wn = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index)
        counted = row_ok & (y != ignore_index)
        keep = counted[:, None] & k_ok[None, :]
        if REMOVE_HITS:
            keep = keep & (neg[None, :] != y[:, None])
        h = _load_rows(H, rows, row_ok, offs_d, D)
        # Rows scaled by g_n / max|g| (in [-1, 1]) so that fp16 operands keep their range; max|g|
        # is applied once at the end.
        g = tl.load(G + rows, mask=counted, other=0.0)
        h_g = (h.to(tl.float32) * (g * inv_gmax)[:, None]).to(h.dtype)
        zs = _negative_logits(h, wn, lq_n, PRECISION, HAS_LQ) * _LOG2E
        dz = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if HAS_CE:
            lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0) * _LOG2E
            dz += ce_w * tl.exp2(zs - lse_s[:, None])
        if HAS_KD:
            ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
            zt = _negative_logits(ht, wtn, lq_n, PRECISION, HAS_LQ) * (_LOG2E * inv_t)
            lse_st = tl.load(LSE_ST + rows, mask=row_ok, other=0.0) * _LOG2E
            lse_tt = tl.load(LSE_TT + rows, mask=row_ok, other=0.0) * _LOG2E
            dz += kd_gw * (tl.exp2(zs * inv_t - lse_st[:, None]) - tl.exp2(zt - lse_tt[:, None]))
        dz = tl.where(keep, dz, 0.0)  # also drops what ignored rows' logits may overflow to
        d_wn += tl.dot(tl.trans(dz.to(h.dtype)), h_g, input_precision=PRECISION)
    d_wn = d_wn * tl.load(GMAX)
    _store_rows(DWN, d_wn, ks, k_ok, offs_d, D)


@triton.jit(do_not_specialize=["M"])
def _scatter_rows_kernel(SRC, ORDER, ENDS, IDS, OUT, M, D, BLOCK_D: tl.constexpr):
    """OUT[IDS[p]] = sum of SRC[ORDER[q]] over the run p <= q < ENDS[p] of equal sorted ids;
    ENDS[p] = p where p does not start a run (nothing to do)."""
    p = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    end = tl.load(ENDS + p)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for q in range(p, end):
        src = tl.load(ORDER + q)
        acc += tl.load(SRC + src * D + offs, mask=offs < D, other=0.0)
    cls = tl.load(IDS + p)
    width = tl.where(end > p, D, 0)  # nothing written where no run starts
    tl.store(OUT + cls * D + offs, acc.to(OUT.dtype.element_ty), mask=offs < width)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _prepare(h, w, ht, wt, y, neg, log_q, alpha, remove_hits):
    """Checks, contiguous operands and the constexprs the kernels share."""
    has_ce, has_kd = alpha < 1, alpha > 0
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton sampled softmax kernels take fp32/fp16/bf16, got {h.dtype}")
    for name, t in (("hidden", h), ("teacher_hidden", ht)):
        if t is not None and t.shape[1] > MAX_DIM:
            raise ValueError(f"{name} has {t.shape[1]} features; the kernels take <= {MAX_DIM}")
    if has_kd and (ht is None or wt is None):
        raise ValueError(f"alpha={alpha} > 0 needs teacher_hidden and teacher_items")
    h, w = h.contiguous(), w.contiguous()
    ht, wt = (ht.contiguous(), wt.contiguous()) if has_kd else (h, w)
    lq = log_q.to(torch.float32).contiguous() if log_q is not None else h
    ops = (h, w, ht, wt, y.contiguous(), neg.contiguous(), lq)
    meta = dict(
        HAS_CE=has_ce, HAS_KD=has_kd, HAS_LQ=log_q is not None, REMOVE_HITS=bool(remove_hits),
        BLOCK_D=_block_d(h.shape[1]), BLOCK_DT=_block_d(ht.shape[1]), PRECISION=_precision(h.dtype),
    )  # fmt: skip
    return ops, meta


def sampled_softmax_fwd(
    hidden: torch.Tensor,
    items: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_items: Optional[torch.Tensor],
    target: torch.Tensor,
    negatives: torch.Tensor,
    log_q: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    block: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, ...]:
    """Row losses [N], log-sum-exps (lse_s, lse_sT, lse_tT) [N], dloss_n/dh_n [N, D] and the
    positive's ds_n0 [N], all fp32 (0 at ignored rows). ``block=(BLOCK_N, BLOCK_K)`` overrides
    the tile shape (tests use it to cover tile edges)."""
    ops, meta = _prepare(hidden, items, teacher_hidden, teacher_items, target, negatives, log_q,
                         alpha, remove_accidental_hits)  # fmt: skip
    h, ht = ops[0], ops[2]
    n, k, dev = h.shape[0], ops[5].shape[0], h.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4)]
    d_h = torch.empty((n, h.shape[1]), dtype=torch.float32, device=dev)
    d_pos = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return (*out, d_h, d_pos)
    cfg = fwd_config(meta["BLOCK_D"], meta["BLOCK_DT"], meta["HAS_CE"], meta["HAS_KD"],
                     h.element_size())  # fmt: skip
    cfg["BLOCK_K"] = cfg.pop("BLOCK_V")
    if meta["HAS_KD"]:
        cfg["num_warps"] = 8
    if block is not None:
        cfg.update(BLOCK_N=block[0], BLOCK_K=block[1])
    weights = (1.0 - alpha, alpha * temperature**2, alpha * temperature)
    _sampled_softmax_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        *ops, *out, d_h, d_pos, n, k, h.shape[1], ht.shape[1], 1.0 / temperature, *weights,
        ignore_index, **meta, **cfg,
    )  # fmt: skip
    return (*out, d_h, d_pos)


def sampled_softmax_bwd(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    items: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_items: Optional[torch.Tensor],
    target: torch.Tensor,
    negatives: torch.Tensor,
    log_q: Optional[torch.Tensor],
    lse_s: torch.Tensor,
    lse_st: torch.Tensor,
    lse_tt: torch.Tensor,
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    block: Optional[Tuple[int, int]] = None,
    d_hidden_rows: Optional[torch.Tensor] = None,
    d_positive: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden [N, D], d_items [C, D]) for ``grad_rows`` [N] on the row losses.

    ``d_hidden_rows`` and ``d_positive``: the forward's, which make d_hidden one product and the
    targets' share of d_items one scaling; without them the forward kernel runs again.
    """
    fwd_args = (hidden, items, teacher_hidden, teacher_items, target, negatives, log_q,
                temperature, alpha, remove_accidental_hits, ignore_index)  # fmt: skip
    ops, meta = _prepare(*fwd_args[:7], alpha, remove_accidental_hits)
    h, w, ht, wt, y, neg, lq = ops
    n, k = h.shape[0], neg.shape[0]
    if n == 0:
        return torch.empty_like(h), torch.zeros_like(w)
    if d_hidden_rows is None or d_positive is None:
        d_hidden_rows, d_positive = sampled_softmax_fwd(*fwd_args, block=block)[4:]
    counted = y != ignore_index
    # May arrive expanded with stride 0; 0 at ignored rows (whatever their incoming gradient).
    g = torch.where(counted, grad_rows.to(torch.float32), 0.0).contiguous()
    d_h = (d_hidden_rows * g[:, None]).to(h.dtype)
    cfg = items_config(meta["BLOCK_D"], meta["BLOCK_DT"], meta["HAS_KD"], h.element_size())
    cfg["BLOCK_K"] = cfg.pop("BLOCK_V")
    if block is not None:
        cfg.update(BLOCK_N=block[0], BLOCK_K=block[1])
    d_wn = torch.empty((k, h.shape[1]), dtype=torch.float32, device=h.device)
    gmax = g.abs().amax().clamp_min(1e-30).reshape(1)  # on the device: no host sync
    stats = [t.contiguous() for t in (lse_s, lse_st, lse_tt)]
    _sampled_softmax_bwd_kernel[(triton.cdiv(k, cfg["BLOCK_K"]),)](
        g, h, w, ht, wt, y, neg, lq, *stats, d_wn, gmax, n, k, h.shape[1], ht.shape[1],
        1.0 / temperature, 1.0 - alpha, alpha * temperature, ignore_index, **meta, **cfg,
    )  # fmt: skip
    # d_items: the targets' rows (ds_n0 g_n h_n) and the negatives' (d_Wn), summed per class.
    rows = torch.cat([h.to(torch.float32) * (d_positive * g)[:, None], d_wn])
    ids = torch.cat([torch.where(counted, y, 0), neg])
    return d_h, scatter_rows(rows, ids, w.shape[0], w.dtype)


def scatter_rows(rows: torch.Tensor, ids: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """``out [c, D]`` (``dtype``) with ``out[i] = sum of rows[j] where ids[j] == i``, summed in fp32
    in the order of ``j``: deterministic, without atomics and without a host sync."""
    m, d = rows.shape
    out = torch.zeros((c, d), dtype=dtype, device=rows.device)
    if m == 0:
        return out
    sorted_ids, order = torch.sort(ids, stable=True)
    pos = torch.arange(m, device=ids.device)
    starts = torch.ones(m, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    ends = torch.where(starts, torch.searchsorted(sorted_ids, sorted_ids, right=True), pos)
    _scatter_rows_kernel[(m,)](
        rows.contiguous(), order, ends, sorted_ids, out, m, d, BLOCK_D=_block_d(d), num_warps=1
    )
    return out
