"""Sampled softmax (cross-entropy and logit distillation over sampled candidates), in plain PyTorch.

Shapes: hidden ``h [N, D]``, item table ``W [C, D]``, target ``y [N]`` (int64, ``ignore_index``
where a row does not count), negatives ``neg [K]`` (int64 class ids shared by every row, drawn
with replacement; duplicates allowed), ``log_q [C]`` (log of each class's sampling probability,
or None: uniform, no correction). Row ``i``'s candidates are its target and the K negatives; its
logits (``[1 + K]``, the positive first) are the logQ-corrected scores::

    s_i0 = h_i . W[y_i]   - log_q[y_i]
    s_ik = h_i . W[neg_k] - log_q[neg_k]     (-inf where neg_k == y_i: an accidental hit, when
                                               remove_accidental_hits)
    CE_i = logsumexp_j(s_ij) - s_i0

With a teacher (``ht [N, Dt]``, ``Wt [C, Dt]``, the same candidates, correction and hits), the
row loss is ``(1 - alpha) * CE_i + alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))``. The
gradient of the row loss with respect to the logits is::

    ds_ij = (1 - alpha) * (softmax(s_i)_j - [j == 0]) + alpha * T * (softmax(s_i/T)_j - softmax(t_i/T)_j)

so ``d h_i = sum_j ds_ij W[c_ij]`` and ``W`` gets ``ds_ij h_i`` at each candidate's row (the
targets' rows and the negatives', duplicates summed). ``log_q`` is a constant: no gradient.

Two implementations:

* :func:`sampled_softmax_loss_reference` / :func:`sampled_distillation_loss_reference` form the
  ``[N, 1 + K]`` logits: the test oracle (run them in float64) and the "formed logits" baseline.
* :func:`sampled_rows_chunked` / :func:`sampled_rows_chunked_backward`: the ``backend="torch"``
  path. It visits the rows in chunks sized so that the ``[rows, K]`` temporaries stay within
  :data:`spnn_fast.reference.distill.LOGIT_BUDGET_BYTES`, keeps three ``[N]`` log-sum-exps per
  row and recomputes the logits in a hand-written backward, so autograd never holds an ``[N, K]``
  buffer: its extra memory is the budget plus ``O((N + K) * D)`` (the positives' and the
  negatives' rows), and the gradient of ``W`` (``[C, D]``, as autograd would give).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast.reference import distill as _distill
from spnn_fast.reference.distill import (
    compute_dtype,
    counted_rows,
    pick_rows,
    reduce_rows,
    scatter_rows,
)

__all__ = [
    "chunk_rows",
    "sampled_distillation_loss_reference",
    "sampled_logits",
    "sampled_rows_chunked",
    "sampled_rows_chunked_backward",
    "sampled_softmax_loss_reference",
]

# [rows, K] buffers of the chunked path: three of the accumulation dtype and a bool one (the hits),
# counted as one more, with room for what the reductions allocate ([rows] each).
_N_TEMPS = 4


def sampled_logits(
    hidden: Tensor,
    items: Tensor,
    target: Tensor,
    negatives: Tensor,
    log_q: Optional[Tensor] = None,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """The ``[N, 1 + K]`` corrected logits (the positive first) in the accumulation dtype; the
    dot products run in the inputs' dtype, as model code writes them. Ignored rows score class 0
    as their positive, uncorrected (their loss is dropped by the callers)."""
    cdt = compute_dtype(hidden.dtype)
    counted = target != ignore_index
    y = torch.where(counted, target, torch.zeros_like(target))
    pos = (hidden * items[y]).sum(-1, keepdim=True)
    z = torch.cat([pos, hidden @ items[negatives].T], dim=1).to(cdt)
    if log_q is not None:
        lq = log_q.to(cdt)
        lq_y = _positive_log_q(lq, y, counted)
        z = z - torch.cat([lq_y[:, None], lq[negatives][None, :].expand(len(y), -1)], dim=1)
    if remove_accidental_hits:
        hit = torch.cat([torch.zeros_like(y, dtype=torch.bool)[:, None],
                         negatives[None, :] == target[:, None]], dim=1)  # fmt: skip
        z = z.masked_fill(hit, float("-inf"))
    return z


def _positive_log_q(lq: Tensor, y: Tensor, counted: Tensor) -> Tensor:
    """``log_q`` at the targets, 0 at ignored rows: their stand-in class may be the padding
    row, whose ``-inf`` would make their (dropped) logits infinite and their gradients NaN."""
    return torch.where(counted, lq[y], torch.zeros_like(lq[y]))


def _mean_like_cross_entropy(rows: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """``cross_entropy``'s reductions of row losses that are 0 at ignored rows: the mean over
    counted rows is NaN when none counts."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().to(rows.dtype)


def sampled_softmax_loss_reference(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    negatives: Tensor,
    *,
    log_q: Optional[Tensor] = None,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Sampled cross-entropy from the formed ``[N, 1 + K]`` logits. ``input [N, D]``, ``target
    [N]`` int64; reductions as ``cross_entropy`` (NaN mean when no row counts). The loss is in
    the accumulation dtype; arguments as in :func:`spnn_fast.functional.sampled_softmax_loss`,
    no validation."""
    z = sampled_logits(input, weight, target, negatives, log_q, remove_accidental_hits,
                       ignore_index)  # fmt: skip
    counted = target != ignore_index
    rows = torch.logsumexp(z, dim=1) - z[:, 0]
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    return _mean_like_cross_entropy(rows, counted, reduction)


def sampled_distillation_loss_reference(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Tensor,
    negatives: Tensor,
    *,
    log_q: Optional[Tensor] = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``(1 - alpha) * sampled CE + alpha * T^2 * KL(p_t || p_s)`` over each row's candidates,
    from the formed logits; the teacher is detached. Reductions as
    :func:`spnn_fast.reference.distill.reduce_rows` (a mean over no row is 0), as
    ``distillation_loss``'s. No validation."""
    args = (target, negatives, log_q, remove_accidental_hits, ignore_index)
    zs = sampled_logits(student_hidden, student_items, *args)
    counted = target != ignore_index
    loss = zs.new_zeros(zs.shape[0])
    if alpha < 1:
        loss = loss + (1.0 - alpha) * (torch.logsumexp(zs, dim=1) - zs[:, 0])
    if alpha > 0:
        zt = sampled_logits(teacher_hidden.detach(), teacher_items.detach(), *args)
        log_ps = torch.log_softmax(zs / temperature, dim=1)
        log_pt = torch.log_softmax(zt / temperature, dim=1)
        kept = torch.isfinite(zt)  # removed hits: p_t = 0 there, and 0 * (-inf - -inf) is NaN
        kl = torch.where(kept, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(zs)).sum(1)
        loss = loss + (alpha * temperature**2) * kl
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    return reduce_rows(loss, target, ignore_index, reduction)


# ---------------------------------------------------------------------------------------------
# The chunked torch path
# ---------------------------------------------------------------------------------------------


def chunk_rows(n: int, k: int, elem_size: int, budget: Optional[int] = None) -> int:
    """Rows per chunk so that the ``[rows, K]`` workspace stays within ``budget`` bytes (default
    :data:`spnn_fast.reference.distill.LOGIT_BUDGET_BYTES`, read at call time); at least one."""
    budget = _distill.LOGIT_BUDGET_BYTES if budget is None else budget
    return max(1, min(max(n, 1), budget // (elem_size * _N_TEMPS * max(k, 1))))


class _Chunks:
    """What the forward and the backward share: the negatives' rows and corrections (gathered
    once), the positives' corrections, the row chunks and a workspace of three ``[rows, K]``
    buffers (and a bool one for the hits) allocated once per call and reused by every chunk:
    fresh temporaries per chunk fragment the CPU heap."""

    def __init__(self, h, w, ht, wt, target, negatives, log_q, temperature, alpha, remove_hits,
                 ignore_index, rows):  # fmt: skip
        self.cdt = cdt = compute_dtype(h.dtype)
        self.has_ce, self.has_kd = alpha < 1, alpha > 0
        self.inv_t = 1.0 / temperature
        self.target, self.negatives, self.remove_hits = target, negatives, remove_hits
        self.counted = target != ignore_index
        self.y = torch.where(self.counted, target, torch.zeros_like(target))
        self.lq_n = self.lq_y = None
        if log_q is not None:
            self.lq_n = log_q.to(cdt)[negatives]
            self.lq_y = _positive_log_q(log_q.to(cdt), self.y, self.counted)
        self.h, self.w, self.wn = h.to(cdt), w, w[negatives].to(cdt)  # [K, D], once
        if self.has_kd:
            self.ht, self.wt, self.wtn = ht.to(cdt), wt, wt[negatives].to(cdt)
        n, k = h.shape[0], negatives.shape[0]
        self.rows = rows or chunk_rows(n, k, torch.finfo(cdt).bits // 8)
        size = min(self.rows, n) * k
        self.bufs = [torch.empty(size, dtype=cdt, device=h.device) for _ in range(3)]
        self.hit_buf = torch.empty(size if remove_hits else 0, dtype=torch.bool, device=h.device)

    def spans(self):
        n = self.h.shape[0]
        return [slice(a, min(a + self.rows, n)) for a in range(0, n, self.rows)]

    def take(self, i: int, sl: slice) -> Tensor:
        r = sl.stop - sl.start
        return self.bufs[i][: r * self.negatives.shape[0]].view(r, -1)

    def hits(self, sl: slice) -> Optional[Tensor]:
        """``[rows, K]`` bool, True where a negative is the row's target (None: hits stay)."""
        if not self.remove_hits:
            return None
        out = self.hit_buf[: (sl.stop - sl.start) * self.negatives.shape[0]].view(
            -1, len(self.negatives)
        )
        return torch.eq(self.negatives[None, :], self.target[sl, None], out=out)

    def logits(self, i: int, h: Tensor, wn: Tensor, sl: slice) -> Tensor:
        """The negatives' corrected logits ``[rows, K]`` in buffer ``i``. Hits are not masked
        here: a hit's logit is its row's positive logit, so it never sets a softmax's maximum
        apart; the exponentials are zeroed at hits instead (no -inf, so no -inf - -inf)."""
        z = torch.matmul(h[sl], wn.T, out=self.take(i, sl))
        return z if self.lq_n is None else z.sub_(self.lq_n)

    def positive(self, h: Tensor, w: Tensor, sl: slice) -> Tensor:
        """The positives' corrected logits ``[rows]``: one row dot product each."""
        s0 = (h[sl] * w[self.y[sl]].to(self.cdt)).sum(1)
        return s0 if self.lq_y is None else s0 - self.lq_y[sl]


def _lse(first: Tensor, z: Tensor, tmp: Tensor, hit: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(lse, m)``: the log-sum-exp over a row's candidates (the positive ``first [r]`` and
    ``z [r, K]`` but its hits), and the shift ``m`` (>= the positive: finite); leaves the
    candidates' ``exp(z - m)`` (0 at hits) in ``tmp``."""
    m = torch.maximum(z.amax(dim=1), first)
    torch.sub(z, m[:, None], out=tmp).exp_()
    if hit is not None:
        tmp.masked_fill_(hit, 0.0)
    return m + torch.log(tmp.sum(dim=1) + torch.exp(first - m)), m


@torch.no_grad()
def sampled_rows_chunked(
    hidden: Tensor,
    items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Tensor,
    negatives: Tensor,
    log_q: Optional[Tensor],
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    rows: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses ``[N]`` (0 at ignored rows) and the log-sum-exps ``lse_s`` (of ``s``),
    ``lse_sT`` (of ``s / T``), ``lse_tT`` (of ``t / T``) over each row's candidates; a statistic
    the call does not need is 0. ``rows`` overrides :func:`chunk_rows`. Inputs are validated by
    the caller; ``target`` and ``negatives`` are int64, ``log_q`` is in the accumulation dtype.
    Only the rows whose target counts are scored (the others' losses and statistics are 0)."""
    idx = counted_rows(target, ignore_index)
    if idx is not None:
        h, ht, y = pick_rows(idx, hidden, teacher_hidden, target)
        part = sampled_rows_chunked(h, items, ht, teacher_items, y, negatives, log_q,
                                    temperature, alpha, remove_accidental_hits, ignore_index,
                                    rows)  # fmt: skip
        return scatter_rows(idx, hidden.shape[0], *part)
    with _no_autocast(hidden):
        c = _Chunks(hidden, items, teacher_hidden, teacher_items, target, negatives, log_q,
                    temperature, alpha, remove_accidental_hits, ignore_index, rows)  # fmt: skip
        n, inv_t = hidden.shape[0], c.inv_t
        loss, lse_s, lse_st, lse_tt = (c.h.new_zeros(n) for _ in range(4))
        for sl in c.spans():
            hit, tmp = c.hits(sl), c.take(2, sl)
            zs, s0 = c.logits(0, c.h, c.wn, sl), c.positive(c.h, c.w, sl)
            if c.has_ce:
                lse_s[sl] = _lse(s0, zs, tmp, hit)[0]
                loss[sl] = (1.0 - alpha) * (lse_s[sl] - s0)
            if c.has_kd:
                zs.mul_(inv_t)
                s0 = s0 * inv_t
                lse_st[sl] = _lse(s0, zs, tmp, hit)[0]
                zt = c.logits(1, c.ht, c.wtn, sl).mul_(inv_t)
                t0 = c.positive(c.ht, c.wt, sl) * inv_t
                lse_tt[sl], m = _lse(t0, zt, tmp, hit)
                # KL = E_{p_t}[t/T - s/T] - lse_tT + lse_sT, with p_t = tmp * exp(m - lse_tT)
                # over the negatives (0 at hits) and exp(t0 - lse_tT) at the positive.
                e = tmp.mul_(zt.sub_(zs)).sum(dim=1) * torch.exp(m - lse_tt[sl])
                e += torch.exp(t0 - lse_tt[sl]) * (t0 - s0)
                loss[sl] += (alpha * temperature**2) * (e - lse_tt[sl] + lse_st[sl])
        loss = torch.where(c.counted, loss, torch.zeros_like(loss))
        return loss, lse_s, lse_st, lse_tt


def _no_autocast(t: Tensor):
    """Autocast off: the chunked path computes in its accumulation dtype, also when called
    inside ``torch.autocast`` (a custom op's body runs under the caller's autocast)."""
    return torch.autocast(t.device.type, enabled=False)


@torch.no_grad()
def sampled_rows_chunked_backward(
    grad_rows: Tensor,
    hidden: Tensor,
    items: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_items: Optional[Tensor],
    target: Tensor,
    negatives: Tensor,
    log_q: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_tt: Tensor,
    temperature: float,
    alpha: float,
    remove_accidental_hits: bool,
    ignore_index: int,
    rows: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """``(d_hidden [N, D], d_items [C, D])`` for ``grad_rows [N]`` on the row losses, the
    candidates' probabilities re-formed chunk by chunk from the saved log-sum-exps (of the
    rows whose target counts; the others get no gradient)."""
    idx = counted_rows(target, ignore_index)
    if idx is not None:
        picked = pick_rows(idx, grad_rows, hidden, teacher_hidden, target, lse_s, lse_st, lse_tt)
        g, h, ht, y, s1, s2, s3 = picked
        d_part, d_w = sampled_rows_chunked_backward(
            g, h, items, ht, teacher_items, y, negatives, log_q, s1, s2, s3, temperature, alpha,
            remove_accidental_hits, ignore_index, rows,
        )  # fmt: skip
        return scatter_rows(idx, hidden.shape[0], d_part)[0], d_w
    with _no_autocast(hidden):
        c = _Chunks(hidden, items, teacher_hidden, teacher_items, target, negatives, log_q,
                    temperature, alpha, remove_accidental_hits, ignore_index, rows)  # fmt: skip
        inv_t, a_ce, a_kd = c.inv_t, 1.0 - alpha, alpha * temperature
        g = grad_rows.to(c.cdt)
        g = torch.where(c.counted, g, torch.zeros_like(g))
        d_h = torch.empty_like(c.h)
        d_wn = torch.zeros_like(c.wn)
        d_w = torch.zeros(items.shape, dtype=c.cdt, device=items.device)
        for sl in c.spans():
            zs, s0 = c.logits(0, c.h, c.wn, sl), c.positive(c.h, c.w, sl)
            d0 = s0.new_zeros(s0.shape)  # the positive's share of ds, then the negatives'
            dz = None
            if c.has_kd:
                t0 = c.positive(c.ht, c.wt, sl) * inv_t
                d0 += a_kd * ((s0 * inv_t - lse_st[sl]).exp() - (t0 - lse_tt[sl]).exp())
                pt = c.logits(2, c.ht, c.wtn, sl).mul_(inv_t).sub_(lse_tt[sl, None]).exp_()
                dz = torch.mul(zs, inv_t, out=c.take(1, sl)).sub_(lse_st[sl, None]).exp_()
                dz.sub_(pt).mul_(a_kd)
            if c.has_ce:
                d0 += a_ce * ((s0 - lse_s[sl]).exp() - 1.0)
                ps = zs.sub_(lse_s[sl, None]).exp_().mul_(a_ce)
                dz = ps if dz is None else dz.add_(ps)
            hit = c.hits(sl)
            if hit is not None:
                dz.masked_fill_(hit, 0.0)
            dz.mul_(g[sl, None])
            d0.mul_(g[sl])
            w_y = c.w[c.y[sl]].to(c.cdt)
            torch.addmm(w_y.mul_(d0[:, None]), dz, c.wn, out=d_h[sl])
            d_wn.addmm_(dz.T, c.h[sl])
            d_w.index_add_(0, c.y[sl], c.h[sl] * d0[:, None])
        d_w.index_add_(0, negatives, d_wn)  # duplicated negatives accumulate
        return d_h.to(hidden.dtype), d_w.to(items.dtype)
