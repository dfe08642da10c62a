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
    "chunked_grads",
    "counted_rows",
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
# The chunk-sized buffers the forward/backward hold: allocated once per call and reused for every
# chunk (fresh temporaries per chunk fragment the CPU heap and cost page faults).
_N_TEMPS = 3


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


def chunk_plan(n: int, v: int, elem_size: int, budget: Optional[int] = None) -> Tuple[int, int]:
    """``(rows, cols)`` of one logits chunk so that the temporaries stay within ``budget`` bytes.

    ``budget`` defaults to :data:`LOGIT_BUDGET_BYTES` (read at call time). Whole catalogue rows
    while at least ``min(n, MIN_CHUNK_ROWS)`` of them fit, else ``MIN_CHUNK_ROWS`` rows and as many
    columns as fit (at least one).
    """
    budget = LOGIT_BUDGET_BYTES if budget is None else budget
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


class _Workspace:
    """``_N_TEMPS`` flat buffers of ``rows * cols`` elements; ``take(i, r, c)`` views one."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(_N_TEMPS)]

    def take(self, i: int, r: int, c: int) -> Tensor:
        return self.bufs[i][: r * c].view(r, c)


def _setup(hs, ws, ht, wt, alpha, chunk):
    """Operands in the accumulation dtype (teacher None without distillation), the flags
    ``(has_ce, has_kd)``, the chunk shape and the workspace, for the forward and the backward."""
    cdt = compute_dtype(hs.dtype)
    has_ce, has_kd = alpha < 1, alpha > 0
    hs, ws = hs.to(cdt), ws.to(cdt)
    ht, wt = (ht.to(cdt), wt.to(cdt)) if has_kd else (None, None)
    rows, cols = chunk or chunk_plan(hs.shape[0], ws.shape[0], torch.finfo(cdt).bits // 8)
    return hs, ws, ht, wt, has_ce, has_kd, rows, cols, _Workspace(rows, cols, cdt, hs.device)


def _max_sumexp(z: Tensor, tmp: Tensor) -> Tuple[Tensor, Tensor]:
    """Row max ``m`` and ``sum(exp(z - m))``; leaves ``exp(z - m)`` in ``tmp``."""
    m = z.amax(dim=1)
    torch.sub(z, m[:, None], out=tmp).exp_()
    return m, tmp.sum(dim=1)


def _combine(lse: Tensor, lse_c: Tensor, first: bool) -> Tensor:
    return lse_c if first else torch.logaddexp(lse, lse_c)


def _safe_target(target: Tensor, ignore_index: int) -> Tensor:
    return torch.where(target != ignore_index, target, torch.zeros_like(target))


def counted_rows(target: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows whose target is not ``ignore_index``, or None when every row counts
    (or there is no target). The chunked paths form logits for those rows only, so a caller may
    pass every position of a batch (static shapes, as ``torch.compile`` wants) and pay for the
    positions that have a target alone. Reads the mask on the host: a sync on a GPU."""
    if target is None:
        return None
    keep = target != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def pick_rows(idx: Tensor, *ts: Optional[Tensor]):
    """Each tensor's rows ``idx`` (None stays None; a sequence of tensors, each one's rows)."""

    def one(t):
        if t is None:
            return None
        if isinstance(t, (list, tuple)):
            return [x.index_select(0, idx) for x in t]
        return t.index_select(0, idx)

    return tuple(one(t) for t in ts)


def scatter_rows(idx: Tensor, n: int, *parts: Tensor) -> Tuple[Tensor, ...]:
    """Each ``[len(idx), ...]`` part placed at rows ``idx`` of zeros ``[n, ...]``."""
    return tuple(p.new_zeros((n, *p.shape[1:])).index_copy_(0, idx, p) for p in parts)


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

    Logits are formed in the accumulation dtype (fp32 for half inputs), chunk by chunk.
    ``chunk=(rows, cols)`` overrides :func:`chunk_plan`. Inputs are assumed validated.
    """
    n, v = student_hidden.shape[0], student_items.shape[0]
    idx = counted_rows(target, ignore_index)
    if idx is not None:  # the counted rows alone; the others' losses and statistics are 0
        hs, ht, y = pick_rows(idx, student_hidden, teacher_hidden, target)
        part = distill_rows_chunked(hs, student_items, ht, teacher_items, y, temperature, alpha,
                                    ignore_index, chunk)  # fmt: skip
        return scatter_rows(idx, n, *part)
    hs, ws, ht, wt, has_ce, has_kd, rows, cols, work = _setup(
        student_hidden, student_items, teacher_hidden, teacher_items, alpha, chunk
    )
    inv_t = 1.0 / temperature
    lse_s, lse_st, lse_tt = (hs.new_zeros(n) for _ in range(3))
    kd_mean = hs.new_zeros(n)  # E_{p_t}[z_t/T - z_s/T], combined across column chunks
    for r0, r1 in _spans(n, rows):
        sl = slice(r0, r1)
        for c0, c1 in _spans(v, cols):
            first = c0 == 0
            zs = torch.matmul(hs[sl], ws[c0:c1].T, out=work.take(0, r1 - r0, c1 - c0))
            tmp = work.take(1, r1 - r0, c1 - c0)
            if has_ce:
                m, s = _max_sumexp(zs, tmp)
                lse_s[sl] = _combine(lse_s[sl], m + s.log(), first)
            if has_kd:
                zs.mul_(inv_t)
                m, s = _max_sumexp(zs, tmp)
                lse_st[sl] = _combine(lse_st[sl], m + s.log(), first)
                zt = torch.matmul(ht[sl], wt[c0:c1].T, out=work.take(2, r1 - r0, c1 - c0))
                zt.mul_(inv_t)
                m, s = _max_sumexp(zt, tmp)  # tmp = exp(z_t/T - m)
                lse_c = m + s.log()
                mean_c = tmp.mul_(zt.sub_(zs)).sum(dim=1).div_(s)  # E_chunk[z_t/T - z_s/T]
                if first:
                    kd_mean[sl], lse_tt[sl] = mean_c, lse_c
                else:
                    new = torch.logaddexp(lse_tt[sl], lse_c)
                    old_w, new_w = torch.exp(lse_tt[sl] - new), torch.exp(lse_c - new)
                    kd_mean[sl] = kd_mean[sl] * old_w + mean_c * new_w
                    lse_tt[sl] = new
    loss = hs.new_zeros(n)
    if has_ce:
        y = _safe_target(target, ignore_index)
        z_y = (hs * ws[y]).sum(dim=1)  # the target logit, O(N D) outside the chunks
        loss += (1.0 - alpha) * (lse_s - z_y)
    if has_kd:
        loss += (alpha * temperature**2) * (kd_mean - lse_tt + lse_st)
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
    idx = counted_rows(target, ignore_index)
    if idx is not None:  # the counted rows alone; the others get no gradient
        picked = pick_rows(idx, grad_rows, student_hidden, teacher_hidden, target, lse_s, lse_st,
                           lse_tt)  # fmt: skip
        g, hs, ht, y, s1, s2, s3 = picked
        d_part, d_ws = distill_rows_chunked_backward(
            g, hs, student_items, ht, teacher_items, y, s1, s2, s3, temperature, alpha,
            ignore_index, chunk,
        )  # fmt: skip
        return scatter_rows(idx, student_hidden.shape[0], d_part)[0], d_ws
    hs, ws, ht, wt, has_ce, has_kd, rows, cols, work = _setup(
        student_hidden, student_items, teacher_hidden, teacher_items, alpha, chunk
    )
    inv_t = 1.0 / temperature

    def teacher_probs(sl: slice, c0: int, c1: int) -> Tensor:  # softmax(z_t / T), one chunk
        pt = torch.matmul(ht[sl], wt[c0:c1].T, out=work.take(1, sl.stop - sl.start, c1 - c0))
        return pt.mul_(inv_t).sub_(lse_tt[sl, None]).exp_()

    d_hs, d_ws = chunked_grads(
        grad_rows, hs, ws, target, lse_s, lse_st, temperature, alpha, ignore_index, has_ce,
        has_kd, rows, cols, work, teacher_probs, dz_buffer=2,
    )  # fmt: skip
    return d_hs.to(student_hidden.dtype), d_ws.to(student_items.dtype)


def chunked_grads(
    grad_rows, hs, ws, target, lse_s, lse_st, temperature, alpha, ignore_index, has_ce, has_kd,
    rows, cols, work, teacher_probs, dz_buffer,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """``(d_hs, d_ws)`` in the accumulation dtype, chunk by chunk, for any teacher:
    ``teacher_probs(rows_slice, c0, c1)`` gives the teacher's (or an ensemble's) softened
    distribution on a chunk, in a workspace buffer other than 0 and ``dz_buffer``. With
    ``dz = (1-alpha)(softmax(z_s) - onehot(y)) + alpha T (softmax(z_s/T) - p_t)`` per row, times
    ``grad_rows``; the one-hot part is added outside the chunks."""
    n, v = hs.shape[0], ws.shape[0]
    inv_t = 1.0 / temperature
    g = grad_rows.to(hs.dtype)
    if target is not None:
        g = torch.where(target != ignore_index, g, torch.zeros_like(g))
    d_hs = torch.zeros_like(hs)
    d_ws = torch.zeros_like(ws)
    for r0, r1 in _spans(n, rows):
        sl = slice(r0, r1)
        for c0, c1 in _spans(v, cols):
            r, c = r1 - r0, c1 - c0
            zs = torch.matmul(hs[sl], ws[c0:c1].T, out=work.take(0, r, c))
            dz = None
            if has_kd:
                pt = teacher_probs(sl, c0, c1)
                dz = torch.mul(zs, inv_t, out=work.take(dz_buffer, r, c))
                dz.sub_(lse_st[sl, None]).exp_().sub_(pt).mul_(alpha * temperature)
            if has_ce:  # the softmax part; the one-hot part is added below, outside the chunks
                ps = zs.sub_(lse_s[sl, None]).exp_().mul_(1.0 - alpha)
                dz = ps if dz is None else dz.add_(ps)
            dz.mul_(g[sl, None])
            d_hs[sl].addmm_(dz, ws[c0:c1])
            d_ws[c0:c1].addmm_(dz.T, hs[sl])
    if has_ce:
        y = _safe_target(target, ignore_index)
        coef = g.mul(alpha - 1.0)[:, None]  # d loss / d z_s[n, y_n] from the one-hot term
        d_hs.add_(coef * ws[y])
        d_ws.index_add_(0, y, coef * hs)
    return d_hs, d_ws
