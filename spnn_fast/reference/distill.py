"""Logit distillation + cross-entropy over an item catalogue, in plain PyTorch.

Shapes: student_hidden ``hs [N, Ds]``, student_items ``Ws [V, Ds]``, teacher_hidden ``ht [N, Dt]``,
teacher_items ``Wt [V, Dt]``, target ``y [N]`` (int64). With ``z_s = hs @ Ws.T`` and
``z_t = ht @ Wt.T`` (``[N, V]``), for every row whose target is not ``ignore_index``::

    loss_row = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

Two implementations live here:

* :func:`distillation_loss_reference` forms the ``N x V`` logits: the test oracle (run it in
  float64) and the "naive eager" benchmark baseline.
* :func:`distill_rows_chunked` / :func:`distill_rows_chunked_backward`: the ``backend="torch"``
  fallback. It visits the logits in ``rows x cols`` chunks sized from a byte budget, combines the
  chunks with log-sum-exp algebra, keeps three ``[N]`` statistics per row and recomputes the logits
  in backward, so its extra memory is ``O(budget + V * Ds)``, never ``O(N * V)``.

Per-row statistics (also what the Triton kernels save): ``lse_s = logsumexp(z_s)``,
``lse_sT = logsumexp(z_s / T)``, ``lse_tT = logsumexp(z_t / T)``; a statistic that the call does
not need (``lse_s`` when alpha = 1, the other two when alpha = 0) is returned as zeros. With them
the gradient of ``loss_row`` with respect to the student logits is::

    dz_s = (1 - alpha) * (softmax(z_s) - onehot(y)) + alpha * T * (softmax(z_s/T) - softmax(z_t/T))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOGIT_BUDGET_BYTES",
    "chunk_plan",
    "distill_rows_chunked",
    "distill_rows_chunked_backward",
    "distillation_loss_reference",
    "reduce_rows",
]

# Bytes of N_chunk x V_chunk temporaries the chunked path may hold at once (all of them together).
LOGIT_BUDGET_BYTES = 64 * 2**20
# Rows per chunk below which the catalogue is split instead: thin row chunks turn the matmuls into
# matrix-vector products that re-read all of Ws for every few rows.
MIN_CHUNK_ROWS = 256
# How many chunk-sized temporaries the forward/backward hold at the same time (logits of both
# models, probabilities, and logsumexp's own buffer).
_N_TEMPS = 4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(loss_rows: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str):
    """``mean`` over counted rows (0 when none counts), ``sum``, or ``none`` (the rows as given)."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / max(loss_rows.shape[0], 1)
    count = (target != ignore_index).sum().clamp(min=1).to(loss_rows.dtype)
    return total / count


def distillation_loss_reference(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_items: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The naive definition: forms the full ``[N, V]`` logits (fp32, or fp64 for fp64 inputs).

    The matmul runs in the input dtype (as model code writes it), softmax and the loss in the
    accumulation dtype. The teacher is detached. Arguments as in
    :func:`spnn_fast.functional.distillation_loss`; no input validation.
    """
    cdt = compute_dtype(student_hidden.dtype)
    n = student_hidden.shape[0]
    zs = (student_hidden @ student_items.T).to(cdt)
    loss = zs.new_zeros(n)
    if alpha < 1:
        ce = F.cross_entropy(zs, target, ignore_index=ignore_index, reduction="none")
        loss = loss + (1.0 - alpha) * ce
    if alpha > 0:
        zt = (teacher_hidden.detach() @ teacher_items.detach().T).to(cdt)
        log_ps = torch.log_softmax(zs / temperature, dim=-1)
        log_pt = torch.log_softmax(zt / temperature, dim=-1)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
        loss = loss + (alpha * temperature**2) * kl
    if target is not None:
        loss = torch.where(target != ignore_index, loss, torch.zeros_like(loss))
    return reduce_rows(loss, target, ignore_index, reduction)


def chunk_plan(n: int, v: int, elem_size: int, budget: int = LOGIT_BUDGET_BYTES) -> Tuple[int, int]:
    """``(rows, cols)`` of one logits chunk so that the temporaries stay within ``budget`` bytes."""
    elems = max(1, budget // (elem_size * _N_TEMPS))
    if n * v <= elems:
        return max(n, 1), v
    rows = elems // v
    if rows >= min(n, MIN_CHUNK_ROWS):
        return min(rows, n), v
    rows = min(n, MIN_CHUNK_ROWS)
    return rows, min(v, max(1, elems // rows))


def _spans(total: int, step: int):
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def _flags(alpha: float) -> Tuple[bool, bool]:
    return alpha < 1, alpha > 0  # (has_ce, has_kd)


def _logits(h: Tensor, w: Tensor, cdt: torch.dtype) -> Tensor:
    if h.dtype in (torch.float16, torch.bfloat16) and h.device.type == "cpu":
        # Half matmuls are slow on the CPU; the product is accumulated in fp32 either way.
        return h.to(cdt) @ w.to(cdt).T
    return (h @ w.T).to(cdt)


@torch.no_grad()
def distill_rows_chunked(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses ``[N]`` (0 at ignored rows) and the statistics ``lse_s, lse_sT, lse_tT``.

    ``chunk=(rows, cols)`` overrides :func:`chunk_plan`. Inputs are assumed validated.
    """
    hs, ws, ht, wt = student_hidden, student_items, teacher_hidden, teacher_items
    n, v = hs.shape[0], ws.shape[0]
    cdt = compute_dtype(hs.dtype)
    has_ce, has_kd = _flags(alpha)
    inv_t = 1.0 / temperature
    rows, cols = chunk or chunk_plan(n, v, torch.finfo(cdt).bits // 8)
    neg_inf = torch.full((n,), float("-inf"), dtype=cdt, device=hs.device)
    lse_s, lse_st, lse_tt = neg_inf.clone(), neg_inf.clone(), neg_inf.clone()
    z_y = hs.new_zeros(n, dtype=cdt)  # target logit
    kd_mean = hs.new_zeros(n, dtype=cdt)  # E_{p_t}[z_t/T - z_s/T], combined across column chunks
    for r0, r1 in _spans(n, rows):
        hs_r = hs[r0:r1]
        ht_r = ht[r0:r1] if has_kd else None
        y_r = target[r0:r1] if has_ce else None
        for c0, c1 in _spans(v, cols):
            zs = _logits(hs_r, ws[c0:c1], cdt)
            if has_ce:
                lse_s[r0:r1] = torch.logaddexp(lse_s[r0:r1], torch.logsumexp(zs, dim=1))
                local = y_r - c0
                inside = (local >= 0) & (local < c1 - c0)
                picked = zs.gather(1, local.clamp(0, c1 - c0 - 1)[:, None])[:, 0]
                z_y[r0:r1] += torch.where(inside, picked, torch.zeros_like(picked))
            if has_kd:
                zs.mul_(inv_t)
                lse_st[r0:r1] = torch.logaddexp(lse_st[r0:r1], torch.logsumexp(zs, dim=1))
                zt = _logits(ht_r, wt[c0:c1], cdt).mul_(inv_t)
                lse_c = torch.logsumexp(zt, dim=1)
                zs.sub_(zt).neg_()  # z_t/T - z_s/T
                mean_c = zt.sub_(lse_c[:, None]).exp_().mul_(zs).sum(1)
                new = torch.logaddexp(lse_tt[r0:r1], lse_c)
                kd_mean[r0:r1] = kd_mean[r0:r1] * torch.exp(lse_tt[r0:r1] - new) + mean_c * torch.exp(
                    lse_c - new
                )
                lse_tt[r0:r1] = new
            del zs
    loss = hs.new_zeros(n, dtype=cdt)
    if has_ce:
        loss += (1.0 - alpha) * (lse_s - z_y)
    else:
        lse_s.zero_()
    if has_kd:
        loss += (alpha * temperature**2) * (kd_mean - lse_tt + lse_st)
    else:
        lse_st.zero_()
        lse_tt.zero_()
    if target is not None:
        loss = torch.where(target != ignore_index, loss, torch.zeros_like(loss))
    return loss, lse_s, lse_st, lse_tt


@torch.no_grad()
def distill_rows_chunked_backward(
    grad_rows: Tensor,
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_tt: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor]:
    """Gradients ``(d_student_hidden, d_student_items)`` for ``grad_rows [N]`` on the row losses."""
    hs, ws, ht, wt = student_hidden, student_items, teacher_hidden, teacher_items
    n, v = hs.shape[0], ws.shape[0]
    cdt = compute_dtype(hs.dtype)
    has_ce, has_kd = _flags(alpha)
    inv_t = 1.0 / temperature
    rows, cols = chunk or chunk_plan(n, v, torch.finfo(cdt).bits // 8)
    g = grad_rows.to(cdt)
    if target is not None:
        g = torch.where(target != ignore_index, g, torch.zeros_like(g))
    d_hs = torch.zeros(hs.shape, dtype=cdt, device=hs.device)
    d_ws = torch.zeros(ws.shape, dtype=cdt, device=ws.device)
    for r0, r1 in _spans(n, rows):
        hs_r = hs[r0:r1].to(cdt)
        g_r = g[r0:r1, None]
        for c0, c1 in _spans(v, cols):
            ws_c = ws[c0:c1].to(cdt)
            zs = hs_r @ ws_c.T if hs.dtype == cdt else _logits(hs[r0:r1], ws[c0:c1], cdt)
            dz = None
            if has_kd:
                pt = _logits(ht[r0:r1], wt[c0:c1], cdt).mul_(inv_t)
                pt.sub_(lse_tt[r0:r1, None]).exp_()
                dz = torch.mul(zs, inv_t).sub_(lse_st[r0:r1, None]).exp_().sub_(pt)
                del pt
                dz.mul_(alpha * temperature)
            if has_ce:
                ps = zs.sub_(lse_s[r0:r1, None]).exp_().mul_(1.0 - alpha)
                local = target[r0:r1] - c0
                hit = torch.nonzero((local >= 0) & (local < c1 - c0)).flatten()
                ps.index_put_((hit, local[hit]), ps.new_full(hit.shape, alpha - 1.0), accumulate=True)
                dz = ps if dz is None else dz.add_(ps)
            del zs
            dz.mul_(g_r)
            d_hs[r0:r1].addmm_(dz, ws_c)
            d_ws[c0:c1].addmm_(dz.T, hs_r)
            del dz
    return d_hs.to(hs.dtype), d_ws.to(ws.dtype)
