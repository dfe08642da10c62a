"""Logit distillation from an ensemble of M teachers + cross-entropy, in plain PyTorch.

Shapes: student ``hs [N, Ds]``, ``Ws [V, Ds]``; teacher m ``ht_m [N, Dt_m]``, ``Wt_m [V, Dt_m]``
(the widths may differ); target ``y [N]``. With ``z_s = hs @ Ws.T``, ``z_m = ht_m @ Wt_m.T`` and
the ensemble's distribution ``p_ens`` (``[N, V]``), every row whose target is not ``ignore_index``
contributes::

    loss_row = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_ens || softmax(z_s / T))

    ensemble="distributions":  p_ens = (1/M) * sum_m softmax(z_m / T)
    ensemble="logits":         p_ens = softmax((1/M) * sum_m z_m / T)

M = 1 is the single-teacher loss of :mod:`spnn_fast.reference.distill`. The "logits" ensemble is
that loss with one concatenated teacher (``cat_m(ht_m) / M`` against ``cat_m(Wt_m)``), so only
"distributions" needs its own chunked path here.

* :func:`distillation_loss_ensemble_reference` forms the logits: the test oracle (in float64).
* :func:`distill_rows_ensemble_chunked` / :func:`distill_rows_ensemble_chunked_backward`: the
  ``backend="torch"`` path of ``ensemble="distributions"``. Per block of rows, a first pass over
  the catalogue gives every teacher's ``lse_m = logsumexp(z_m / T)`` (and the student's
  ``lse_s = logsumexp(z_s)``, ``lse_sT = logsumexp(z_s / T)``); a second pass sums
  ``p_ens,c * (log p_ens,c - log p_s,c)`` with ``log p_ens,c = logsumexp_m(z_m,c / T - lse_m) -
  log M``, accumulated teacher by teacher in one chunk buffer. When a chunk holds whole
  catalogue rows (the chunk plan's usual case) the two passes are one: each teacher's ``lse_m``
  is known as soon as its logits are. The backward recomputes ``p_ens``
  chunk by chunk from the saved ``lse_m [N, M]``::

    dz_s = (1 - alpha) * (softmax(z_s) - onehot(y)) + alpha * T * (softmax(z_s / T) - p_ens)

  The chunks are those of :func:`spnn_fast.reference.distill.chunk_plan` (the same three buffers
  under the same byte budget), visited in a fixed order: the extra memory is the budget, the
  ``O(N * M)`` statistics and copies of the operands (the teachers' hidden states divided by T;
  the tables in fp32 for half inputs), never ``O(N * V)``, and a call's result is deterministic.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from spnn_fast.reference import distill as _single

__all__ = [
    "ENSEMBLES",
    "distill_rows_ensemble_chunked",
    "distill_rows_ensemble_chunked_backward",
    "distillation_loss_ensemble_reference",
]

# How the teachers' predictions combine (see the module docstring).
ENSEMBLES = ("distributions", "logits")


def distillation_loss_ensemble_reference(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Sequence[Tensor],
    teacher_items: Sequence[Tensor],
    target: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    ensemble: str = "distributions",
) -> Tensor:
    """The naive definition: forms the ``[N, V]`` logits of the student and of every teacher
    (fp32, or fp64 for fp64 inputs). Arguments as in
    :func:`spnn_fast.functional.distillation_loss` with lists of teachers; no validation."""
    cdt = _single.compute_dtype(student_hidden.dtype)
    n = student_hidden.shape[0]
    zs = (student_hidden @ student_items.T).to(cdt)
    loss = zs.new_zeros(n)
    if alpha < 1:
        ce = F.cross_entropy(zs, target, ignore_index=ignore_index, reduction="none")
        loss = loss + (1.0 - alpha) * ce
    if alpha > 0:
        zts = [(h.detach() @ w.detach().T).to(cdt) for h, w in zip(teacher_hidden, teacher_items)]
        m = len(zts)
        if ensemble == "logits":
            log_pe = torch.log_softmax(sum(zts) / (m * temperature), dim=-1)
        else:
            log_pm = torch.stack([torch.log_softmax(z / temperature, dim=-1) for z in zts])
            log_pe = torch.logsumexp(log_pm, dim=0) - math.log(m)
        log_ps = torch.log_softmax(zs / temperature, dim=-1)
        kl = F.kl_div(log_ps, log_pe, log_target=True, reduction="none").sum(-1)
        loss = loss + (alpha * temperature**2) * kl
    if target is not None:
        loss = torch.where(target != ignore_index, loss, torch.zeros_like(loss))
    return _single.reduce_rows(loss, target, ignore_index, reduction)


def _setup(hs, ws, hts, wts, alpha, temperature, chunk):
    """Student operands in the accumulation dtype, the teachers' (empty without distillation;
    the hidden states divided by T, so that their matmuls give ``z_m / T`` at once), the flags
    ``(has_ce, has_kd)``, the chunk shape and the three-buffer workspace."""
    hs, ws, _, _, _, _, rows, cols, work = _single._setup(hs, ws, None, None, 0.0, chunk)
    has_ce, has_kd = alpha < 1, alpha > 0
    hts = [h.to(hs.dtype) / temperature for h in hts] if has_kd else []
    wts = [w.to(hs.dtype) for w in wts] if has_kd else []
    return hs, ws, hts, wts, has_ce, has_kd, rows, cols, work


def _log_p_ens(hts, wts, sl, c0, c1, lse_t, out: Tensor, scratch: Tensor) -> Tensor:
    """``log p_ens`` of rows ``sl`` and columns ``c0:c1`` into ``out``: teacher 0's log-softmax
    (from its saved ``lse``), then each further teacher's, formed in ``scratch``, merged with
    ``logaddexp`` in place; minus ``log M``. The teachers are visited in their order."""
    for k, (h, w) in enumerate(zip(hts, wts)):
        z = torch.matmul(h[sl], w[c0:c1].T, out=out if k == 0 else scratch)
        z.sub_(lse_t[sl, k, None])
        if k > 0:
            torch.logaddexp(out, z, out=out)
    if len(hts) > 1:
        out.sub_(math.log(len(hts)))
    return out


def _lse_pass(ops, sl, v, cols, inv_t, has_ce, has_kd, work, lse_s, lse_st, lse_t) -> None:
    """Pass 1 over the catalogue for rows ``sl``: ``lse_s``, ``lse_sT`` and every teacher's
    ``lse_t``, combined across column chunks."""
    hs, ws, hts, wts = ops
    r = sl.stop - sl.start
    for c0, c1 in _single._spans(v, cols):
        first, c = c0 == 0, c1 - c0
        zs = torch.matmul(hs[sl], ws[c0:c1].T, out=work.take(0, r, c))
        tmp = work.take(1, r, c)
        if has_ce:
            mx, s = _single._max_sumexp(zs, tmp)
            lse_s[sl] = _single._combine(lse_s[sl], mx + s.log(), first)
        if has_kd:
            mx, s = _single._max_sumexp(zs.mul_(inv_t), tmp)
            lse_st[sl] = _single._combine(lse_st[sl], mx + s.log(), first)
            for k, (h, w) in enumerate(zip(hts, wts)):
                zt = torch.matmul(h[sl], w[c0:c1].T, out=work.take(2, r, c))
                mx, s = _single._max_sumexp(zt, tmp)
                lse_t[sl, k] = _single._combine(lse_t[sl, k], mx + s.log(), first)


def _kl_pass(ops, sl, v, cols, inv_t, work, lse_st, lse_t) -> Tensor:
    """Pass 2 for rows ``sl``, from pass 1's statistics: ``KL(p_ens || p_s) =
    sum_c p_ens,c * (log p_ens,c - log p_s,c)``, summed over the column chunks in order."""
    hs, ws, hts, wts = ops
    r = sl.stop - sl.start
    kl = hs.new_zeros(r)
    for c0, c1 in _single._spans(v, cols):
        c = c1 - c0
        log_ps = torch.matmul(hs[sl], ws[c0:c1].T, out=work.take(0, r, c))
        log_ps.mul_(inv_t).sub_(lse_st[sl, None])
        log_pe = _log_p_ens(hts, wts, sl, c0, c1, lse_t, work.take(2, r, c), work.take(1, r, c))
        p_e = torch.exp(log_pe, out=work.take(1, r, c))
        kl += p_e.mul_(log_pe.sub_(log_ps)).sum(dim=1)
    return kl


def _kl_whole_rows(ops, sl, v, inv_t, has_ce, work, lse_s, lse_st, lse_t) -> Tensor:
    """Both passes at once when a chunk holds whole catalogue rows (the usual case): each
    teacher's ``lse`` is then known as soon as its logits are formed, so its log-softmax merges
    into ``log p_ens`` at once and no logits are formed twice. The same statistics as
    :func:`_lse_pass` and the same KL as :func:`_kl_pass`, in half the matmuls."""
    hs, ws, hts, wts = ops
    r = sl.stop - sl.start
    log_pe, scratch, tmp = work.take(2, r, v), work.take(1, r, v), work.take(0, r, v)
    for k, (h, w) in enumerate(zip(hts, wts)):
        z = torch.matmul(h[sl], w.T, out=log_pe if k == 0 else scratch)
        mx, s = _single._max_sumexp(z, tmp)
        lse_t[sl, k] = mx + s.log()
        z.sub_(lse_t[sl, k, None])
        if k > 0:
            torch.logaddexp(log_pe, z, out=log_pe)
    if len(hts) > 1:
        log_pe.sub_(math.log(len(hts)))
    zs = torch.matmul(hs[sl], ws.T, out=scratch)
    if has_ce:
        mx, s = _single._max_sumexp(zs, tmp)
        lse_s[sl] = mx + s.log()
    mx, s = _single._max_sumexp(zs.mul_(inv_t), tmp)
    lse_st[sl] = mx + s.log()
    log_ps = zs.sub_(lse_st[sl, None])
    p_e = torch.exp(log_pe, out=tmp)
    return p_e.mul_(log_pe.sub_(log_ps)).sum(dim=1)


@torch.no_grad()
def distill_rows_ensemble_chunked(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Sequence[Tensor],
    teacher_items: Sequence[Tensor],
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses ``[N]`` (0 at ignored rows) of ``ensemble="distributions"`` and the
    statistics ``lse_s [N]``, ``lse_sT [N]``, ``lse_t [N, M]`` (zeros where the call does not
    need them: ``lse_s`` when alpha = 1, the others when alpha = 0).

    Logits are formed in the accumulation dtype, chunk by chunk; ``chunk=(rows, cols)``
    overrides :func:`spnn_fast.reference.distill.chunk_plan`. Inputs are assumed validated.
    """
    n, v, m = student_hidden.shape[0], student_items.shape[0], len(teacher_hidden)
    idx = _single.counted_rows(target, ignore_index)
    if idx is not None:  # the counted rows alone; the others' losses and statistics are 0
        hs, hts, y = _single.pick_rows(idx, student_hidden, teacher_hidden, target)
        part = distill_rows_ensemble_chunked(hs, student_items, hts, teacher_items, y,
                                             temperature, alpha, ignore_index, chunk)  # fmt: skip
        return _single.scatter_rows(idx, n, *part)
    hs, ws, hts, wts, has_ce, has_kd, rows, cols, work = _setup(
        student_hidden, student_items, teacher_hidden, teacher_items, alpha, temperature, chunk
    )
    ops, inv_t = (hs, ws, hts, wts), 1.0 / temperature
    lse_s, lse_st, kl = (hs.new_zeros(n) for _ in range(3))
    lse_t = hs.new_zeros(n, m)
    for r0, r1 in _single._spans(n, rows):
        sl = slice(r0, r1)
        if has_kd and cols == v:
            kl[sl] = _kl_whole_rows(ops, sl, v, inv_t, has_ce, work, lse_s, lse_st, lse_t)
            continue
        _lse_pass(ops, sl, v, cols, inv_t, has_ce, has_kd, work, lse_s, lse_st, lse_t)
        if has_kd:
            kl[sl] = _kl_pass(ops, sl, v, cols, inv_t, work, lse_st, lse_t)
    loss = hs.new_zeros(n)
    if has_ce:
        y = _single._safe_target(target, ignore_index)
        loss += (1.0 - alpha) * (lse_s - (hs * ws[y]).sum(dim=1))
    if has_kd:
        loss += (alpha * temperature**2) * kl
    if target is not None:
        loss = torch.where(target != ignore_index, loss, torch.zeros_like(loss))
    return loss, lse_s, lse_st, lse_t


@torch.no_grad()
def distill_rows_ensemble_chunked_backward(
    grad_rows: Tensor,
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Sequence[Tensor],
    teacher_items: Sequence[Tensor],
    target: Optional[Tensor],
    lse_s: Tensor,
    lse_st: Tensor,
    lse_t: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    chunk: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor]:
    """Gradients ``(d_student_hidden, d_student_items)`` for ``grad_rows [N]`` on the row losses
    of :func:`distill_rows_ensemble_chunked`, from its statistics."""
    idx = _single.counted_rows(target, ignore_index)
    if idx is not None:  # the counted rows alone; the others get no gradient
        picked = _single.pick_rows(idx, grad_rows, student_hidden, teacher_hidden, target, lse_s,
                                   lse_st, lse_t)  # fmt: skip
        g, hs, hts, y, s1, s2, s3 = picked
        d_part, d_ws = distill_rows_ensemble_chunked_backward(
            g, hs, student_items, hts, teacher_items, y, s1, s2, s3, temperature, alpha,
            ignore_index, chunk,
        )  # fmt: skip
        return _single.scatter_rows(idx, student_hidden.shape[0], d_part)[0], d_ws
    hs, ws, hts, wts, has_ce, has_kd, rows, cols, work = _setup(
        student_hidden, student_items, teacher_hidden, teacher_items, alpha, temperature, chunk
    )

    def teacher_probs(sl: slice, c0: int, c1: int) -> Tensor:  # p_ens on one chunk
        r, c = sl.stop - sl.start, c1 - c0
        return _log_p_ens(
            hts, wts, sl, c0, c1, lse_t, work.take(2, r, c), work.take(1, r, c)
        ).exp_()

    d_hs, d_ws = _single.chunked_grads(
        grad_rows, hs, ws, target, lse_s, lse_st, temperature, alpha, ignore_index, has_ce,
        has_kd, rows, cols, work, teacher_probs, dz_buffer=1,
    )  # fmt: skip
    return d_hs.to(student_hidden.dtype), d_ws.to(student_items.dtype)
