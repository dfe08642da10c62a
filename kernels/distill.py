"""Fused linear distillation + cross-entropy loss over an item catalogue (Triton).

Math (per row n with target y_n != ignore_index; z_s = hs @ Ws.T, z_t = ht @ Wt.T, never formed)::

    loss_n = (1 - alpha) * (lse(z_s) - z_s[y_n])
           + alpha * T^2 * (E_{p_t}[z_t/T - z_s/T] - lse(z_t/T) + lse(z_s/T)),  p_t = softmax(z_t/T)

Shapes: hs [N, Ds], Ws [V, Ds], ht [N, Dt], Wt [V, Dt] (one float dtype), y [N] int64;
Ds, Dt <= 256 (padded to a power of two >= 16 in registers). N and V are runtime ints.

* ``_distill_fwd_kernel``: grid over blocks of BLOCK_N rows; each program loops over V in BLOCK_V
  tiles, computes the tile logits with ``tl.dot`` and keeps online (max, sum) pairs for z_s,
  z_s/T and z_t/T, an online rescaled accumulation of sum exp(z_t/T - m) (z_t/T - z_s/T), and
  the target logit. Writes loss [N] and lse_s, lse_sT, lse_tT [N] (fp32).
* ``_distill_bwd_dh_kernel``: grid over row blocks, loop over V: recomputes the tile logits,
  dz = g_n [(1-alpha)(softmax(z_s) - onehot(y)) + alpha T (softmax(z_s/T) - softmax(z_t/T))]
  from the saved statistics and accumulates d_hs = dz @ Ws.
* ``_distill_bwd_dw_kernel``: grid over V blocks, loop over row blocks: the same dz, accumulates
  d_Ws = dz.T @ hs. Each program owns its output rows: deterministic, no atomics.

No N x V buffer of any dtype exists; accumulation is fp32. fp32 inputs use "tf32x3" dots (about
fp32 accuracy on tensor cores; "tf32" where torch allows TF32 matmuls). Tile shapes depend on Ds,
Dt and the dtype only (:func:`_config`), sized so that every variant fits sm_90 shared memory (the
tests compile them to sm_90 cubins without a GPU). Checked against
``spnn_fast.reference.distill.distillation_loss_reference`` (float64) in tests/test_distill.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from spnn_fast.kernels import _device

from spnn_fast.limits import DISTILL_MAX_DIM

__all__ = ["MAX_DIM", "distill_bwd", "distill_fwd"]

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
def _load_row_grads(
    G, Y, LSE_S, LSE_ST, LSE_TT, rows, row_ok, ignore_index,
    HAS_TARGET: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The per-row inputs of the backward: incoming gradient (0 at ignored rows), target, and the
    three saved log-sum-exps."""
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    y = _load_targets(Y, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N)
    if HAS_TARGET:
        g = tl.where(y != ignore_index, g, 0.0)
    lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0)
    lse_st = tl.load(LSE_ST + rows, mask=row_ok, other=0.0)
    lse_tt = tl.load(LSE_TT + rows, mask=row_ok, other=0.0)
    return g, y, lse_s, lse_st, lse_tt


@triton.jit(do_not_specialize=["N", "V"])
def _distill_fwd_kernel(
    HS,
    WS,
    HT,
    WT,
    Y,
    LOSS,
    LSE_S,
    LSE_ST,
    LSE_TT,
    N,
    V,
    DS,
    DT,
    inv_t,
    ce_w,
    kd_w,
    ignore_index,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_ds = tl.arange(0, BLOCK_DS)
    hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
    if HAS_KD:
        offs_dt = tl.arange(0, BLOCK_DT)
        ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
    y = _load_targets(Y, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N)
    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_st = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_st = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_tt = tl.full([BLOCK_N], neg_inf, tl.float32)
    l_tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        ws = _load_rows(WS, cols, col_ok, offs_ds, DS)
        # Masked columns hold logit 0 (zero rows of Ws); -inf only where they enter a max/exp.
        zs = tl.dot(hs, tl.trans(ws), input_precision=PRECISION)
        if HAS_CE:
            zs_m = tl.where(col_ok[None, :], zs, neg_inf)
            m_new = tl.maximum(m_s, tl.max(zs_m, axis=1))
            l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs_m - m_new[:, None]), axis=1)
            m_s = m_new
            hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
            z_y += tl.sum(tl.where(hit, zs, 0.0), axis=1)
        if HAS_KD:
            wt = _load_rows(WT, cols, col_ok, offs_dt, DT)
            zt = tl.dot(ht, tl.trans(wt), input_precision=PRECISION) * inv_t
            zs_t = zs * inv_t
            zst_m = tl.where(col_ok[None, :], zs_t, neg_inf)
            m_new = tl.maximum(m_st, tl.max(zst_m, axis=1))
            l_st = l_st * tl.exp(m_st - m_new) + tl.sum(tl.exp(zst_m - m_new[:, None]), axis=1)
            m_st = m_new
            ztt_m = tl.where(col_ok[None, :], zt, neg_inf)
            m_new = tl.maximum(m_tt, tl.max(ztt_m, axis=1))
            scale = tl.exp(m_tt - m_new)
            p = tl.exp(ztt_m - m_new[:, None])  # 0 at masked columns, where zt - zs_t is 0
            l_tt = l_tt * scale + tl.sum(p, axis=1)
            acc = acc * scale + tl.sum(p * (zt - zs_t), axis=1)
            m_tt = m_new
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_st = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_CE:
        lse_s = m_s + tl.log(l_s)
        loss += ce_w * (lse_s - z_y)
    if HAS_KD:
        lse_st = m_st + tl.log(l_st)
        lse_tt = m_tt + tl.log(l_tt)
        loss += kd_w * (acc / l_tt - lse_tt + lse_st)
    if HAS_TARGET:
        loss = tl.where(y != ignore_index, loss, 0.0)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE_S + rows, lse_s, mask=row_ok)
    tl.store(LSE_ST + rows, lse_st, mask=row_ok)
    tl.store(LSE_TT + rows, lse_tt, mask=row_ok)


@triton.jit
def _dlogits(
    hs,
    ws,
    ht,
    wt,
    y,
    lse_s,
    lse_st,
    lse_tt,
    cols,
    col_ok,
    inv_t,
    ce_w,
    kd_gw,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dloss_n/dz_s for one [rows, cols] tile before the row's incoming gradient g_n (fp32, in
    [-1, 1] up to the weights): recomputed from the saved statistics."""
    zs = tl.dot(hs, tl.trans(ws), input_precision=PRECISION)
    dz = tl.zeros(zs.shape, dtype=tl.float32)
    if HAS_CE:
        ps = tl.exp(zs - lse_s[:, None])
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dz += ce_w * (ps - onehot)
    if HAS_KD:
        zt = tl.dot(ht, tl.trans(wt), input_precision=PRECISION)
        pst = tl.exp(zs * inv_t - lse_st[:, None])
        ptt = tl.exp(zt * inv_t - lse_tt[:, None])
        dz += kd_gw * (pst - ptt)
    return tl.where(col_ok[None, :], dz, 0.0)


@triton.jit(do_not_specialize=["N", "V"])
def _distill_bwd_dh_kernel(
    G,
    HS,
    WS,
    HT,
    WT,
    Y,
    LSE_S,
    LSE_ST,
    LSE_TT,
    DHS,
    N,
    V,
    DS,
    DT,
    inv_t,
    ce_w,
    kd_gw,
    ignore_index,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
    ht = hs  # placeholder when there is no teacher (never read)
    if HAS_KD:
        ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
    g, y, lse_s, lse_st, lse_tt = _load_row_grads(
        G, Y, LSE_S, LSE_ST, LSE_TT, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N
    )
    d_hs = tl.zeros([BLOCK_N, BLOCK_DS], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        ws = _load_rows(WS, cols, col_ok, offs_ds, DS)
        wt = ws
        if HAS_KD:
            wt = _load_rows(WT, cols, col_ok, offs_dt, DT)
        dz = _dlogits(
            hs, ws, ht, wt, y, lse_s, lse_st, lse_tt, cols, col_ok, inv_t, ce_w, kd_gw,
            HAS_CE, HAS_KD, PRECISION,
        )  # fmt: skip
        d_hs += tl.dot(dz.to(ws.dtype), ws, input_precision=PRECISION)
    # g_n scales whole rows: applied after the products, so fp16 never holds g * dz (underflow).
    d_hs = d_hs * g[:, None]
    _store_rows(DHS, d_hs, rows, row_ok, offs_ds, DS)


@triton.jit(do_not_specialize=["N", "V"])
def _distill_bwd_dw_kernel(
    G,
    HS,
    WS,
    HT,
    WT,
    Y,
    LSE_S,
    LSE_ST,
    LSE_TT,
    DWS,
    GMAX,
    N,
    V,
    DS,
    DT,
    inv_t,
    ce_w,
    kd_gw,
    ignore_index,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    ws = _load_rows(WS, cols, col_ok, offs_ds, DS)
    wt = ws  # placeholder when there is no teacher (never read)
    if HAS_KD:
        wt = _load_rows(WT, cols, col_ok, offs_dt, DT)
    gmax = tl.load(GMAX)
    inv_gmax = 1.0 / gmax
    d_ws = tl.zeros([BLOCK_V, BLOCK_DS], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        hs = _load_rows(HS, rows, row_ok, offs_ds, DS)
        ht = hs
        if HAS_KD:
            ht = _load_rows(HT, rows, row_ok, offs_dt, DT)
        g, y, lse_s, lse_st, lse_tt = _load_row_grads(
            G, Y, LSE_S, LSE_ST, LSE_TT, rows, row_ok, ignore_index, HAS_TARGET, BLOCK_N
        )
        dz = _dlogits(
            hs, ws, ht, wt, y, lse_s, lse_st, lse_tt, cols, col_ok, inv_t, ce_w, kd_gw,
            HAS_CE, HAS_KD, PRECISION,
        )  # fmt: skip
        # Rows scaled by g_n / max|g| (in [-1, 1]) so that fp16 operands keep their range.
        hs_g = (hs.to(tl.float32) * (g * inv_gmax)[:, None]).to(hs.dtype)
        d_ws += tl.dot(tl.trans(dz.to(hs.dtype)), hs_g, input_precision=PRECISION)
    d_ws = d_ws * gmax
    _store_rows(DWS, d_ws, cols, col_ok, offs_ds, DS)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _config(block_ds: int, block_dt: int, has_kd: bool, elem: int) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps, num_stages): tiles shrink as the rows held in registers
    widen; pipeline stages are limited so the staged operand tiles fit in shared memory."""
    width = block_ds + (block_dt if has_kd else 0)
    # Measured on sm_90 cubins: without a teacher, fp32 kernels need the shared memory of a
    # student + teacher pair twice as wide (with the wide tiles, 256-288 KiB > the 227 KiB limit).
    tile_width = 2 * width if elem == 4 and not has_kd else width
    if tile_width <= 128:
        block_n, block_v = 64, 128
    elif tile_width <= 256:
        block_n, block_v = 64, 64
    else:  # fp32 operands this wide need narrower item tiles to fit shared memory (sm_90)
        block_n, block_v = (32, 64) if elem < 4 else (32, 32)
    per_stage = max(block_n, block_v) * width * elem
    stages = max(1, min(3, (96 * 1024) // per_stage))
    return block_n, block_v, 8, stages


def _fill_gpu(count: int, block: int, device: torch.device) -> int:
    """Halve a tile (down to 16) until its grid gives every SM two programs: a grid over row
    (or item) blocks alone leaves most of the GPU idle at N = 4096. Bucketed: at most three
    values per configuration, so N and V still do not drive recompilation."""
    sms = _device.multiprocessor_count(device)
    if sms is None:
        return block
    while block > 16 and triton.cdiv(count, block) < 2 * sms:
        block //= 2
    return block


def _dw_blocks(block_n: int, block_v: int, v: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_V) of the d_student_items kernel: item blocks own the grid, row tiles are
    iterated. A function of its own so that ``benchmarks/tune_gpu.py`` can sweep it alone: at
    bf16, D = 64, the default 64-row tiles spill registers on sm_90 (136 B of stack per thread
    for CE, 560 B with the teacher, per cuobjdump) where 32-row tiles do not; not yet timed."""
    return block_n, _fill_gpu(v, block_v, device)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 inputs (half inputs ignore it). TF32 where PyTorch allows it for
    its own matmuls; otherwise "tf32x3" (three TF32 products, about fp32 accuracy, on tensor
    cores): "ieee" lowers to FMA loops that spill registers heavily at these tile sizes."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _prepare(hs, ws, ht, wt, y, alpha):
    """Checks, contiguous operands ``(hs, ws, ht, wt, y)``, the default ``(BLOCK_N, BLOCK_V)``
    and the launch parameters that the forward and both backward kernels share."""
    has_ce, has_kd = alpha < 1, alpha > 0
    if hs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton distillation kernels take fp32/fp16/bf16, got {hs.dtype}")
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht)):
        if t is not None and t.shape[1] > MAX_DIM:
            raise ValueError(
                f"{name} has {t.shape[1]} features; the Triton kernels take <= {MAX_DIM}"
            )
    hs, ws = hs.contiguous(), ws.contiguous()
    if has_kd:
        ht, wt = ht.contiguous(), wt.contiguous()
    else:
        ht, wt = hs, ws  # never read: HAS_KD compiles the teacher away
    y_arg = y.contiguous() if y is not None else hs
    bds, bdt = _block_d(hs.shape[1]), _block_d(ht.shape[1])
    block_n, block_v, warps, stages = _config(bds, bdt, has_kd, hs.element_size())
    meta = dict(
        HAS_CE=has_ce, HAS_KD=has_kd, HAS_TARGET=y is not None, BLOCK_DS=bds, BLOCK_DT=bdt,
        PRECISION=_precision(hs.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return (hs, ws, ht, wt, y_arg), (block_n, block_v), meta


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses [N] and statistics (lse_s, lse_sT, lse_tT) [N], all fp32.

    ``block=(BLOCK_N, BLOCK_V)`` overrides the tile shape (tests use it to cover tile edges).
    """
    (hs, ws, ht, wt, y), (block_n, block_v), meta = _prepare(
        student_hidden, student_items, teacher_hidden, teacher_items, target, alpha
    )
    n, v = hs.shape[0], ws.shape[0]
    out = [torch.empty(n, dtype=torch.float32, device=hs.device) for _ in range(4)]
    if n == 0:
        return tuple(out)
    if block is None:
        block = (_fill_gpu(n, block_n, hs.device), block_v)
    _distill_fwd_kernel[(triton.cdiv(n, block[0]),)](
        hs, ws, ht, wt, y, *out, n, v, hs.shape[1], ht.shape[1],
        1.0 / temperature, 1.0 - alpha, alpha * temperature**2, ignore_index,
        BLOCK_N=block[0], BLOCK_V=block[1], **meta,
    )  # fmt: skip
    return tuple(out)


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d_student_hidden, d_student_items) for ``grad_rows`` [N] on the row losses."""
    (hs, ws, ht, wt, y), (block_n, block_v), meta = _prepare(
        student_hidden, student_items, teacher_hidden, teacher_items, target, alpha
    )
    n, v = hs.shape[0], ws.shape[0]
    d_hs, d_ws = torch.empty_like(hs), torch.empty_like(ws)
    if n == 0:
        return d_hs, d_ws.zero_()
    g = grad_rows.to(torch.float32).contiguous()  # may arrive expanded with stride 0
    stats = [t.contiguous() for t in (lse_s, lse_st, lse_tt)]
    # d_hs: a grid over row blocks; d_ws: a grid over item blocks. Each fills the GPU alone.
    dh_blocks = (_fill_gpu(n, block_n, hs.device), block_v)
    dw_blocks = _dw_blocks(block_n, block_v, v, hs.device)
    if block is not None:
        dh_blocks = dw_blocks = block
    scalars = (n, v, hs.shape[1], ht.shape[1], 1.0 / temperature, 1.0 - alpha,
               alpha * temperature, ignore_index)  # fmt: skip
    _distill_bwd_dh_kernel[(triton.cdiv(n, dh_blocks[0]),)](
        g, hs, ws, ht, wt, y, *stats, d_hs, *scalars,
        BLOCK_N=dh_blocks[0], BLOCK_V=dh_blocks[1], **meta,
    )  # fmt: skip
    gmax = g.abs().amax().clamp_min(1e-30).reshape(1)  # on the device: no host sync
    _distill_bwd_dw_kernel[(triton.cdiv(v, dw_blocks[1]),)](
        g, hs, ws, ht, wt, y, *stats, d_ws, gmax, *scalars,
        BLOCK_N=dw_blocks[0], BLOCK_V=dw_blocks[1], **meta,
    )  # fmt: skip
    return d_hs, d_ws
