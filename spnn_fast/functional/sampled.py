"""The sampled softmax losses, for catalogues too large to score whole at every step:
``sampled_softmax_loss`` (cross-entropy over each row's target and K shared negatives, with the
logQ correction) and ``sampled_distillation_loss`` (the same plus logit distillation over the
same candidates). :class:`spnn_fast.sampling.NegativeSampler` draws the negatives and gives
``log_q``."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from spnn_fast import limits
from spnn_fast._checks import FLOAT_DTYPES, check_matrix, check_same, describe, is_int
from spnn_fast.functional._dispatch import check_values, triton_or_torch
from spnn_fast.functional.losses import (
    _REDUCTIONS,
    _autocast_dtype,
    _check_distill_args,
    _check_target_values,
    _rows,
    _target_rows,
)

__all__ = ["sampled_distillation_loss", "sampled_softmax_loss"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_negatives(negatives: object, c: int, h: Tensor) -> Tensor:
    """``negatives``: a 1-D integer tensor ``[K >= 1]`` of class ids in ``[0, C)`` on the rows'
    device; int64."""
    if not isinstance(negatives, Tensor) or negatives.dtype not in _INT_DTYPES:
        got = describe(negatives) if isinstance(negatives, Tensor) else type(negatives).__name__
        raise ValueError(f"negatives must be an integer tensor [K] of class ids, got {got}")
    if negatives.dim() != 1 or negatives.shape[0] < 1:
        raise ValueError(f"negatives must be 1-D [K >= 1] (shared by every row), got "
                         f"{describe(negatives)}")  # fmt: skip
    check_same("input", h, "negatives", negatives, dtype=False)
    neg = negatives.to(torch.int64).contiguous()
    bad = (neg < 0) | (neg >= c)
    check_values(
        ~bad.any(),
        lambda: (
            f"negatives holds {int(neg[bad][0])}, outside [0, C={c}) ({int(bad.sum())} "
            f"such entries)"
        ),  # fmt: skip
        f"negatives outside [0, C={c})",
    )
    return neg


def _check_log_q(log_q: object, c: int, h: Tensor, y: Tensor, neg: Tensor, ignore_index: int):
    """``log_q``: None or a float ``[C]`` tensor on the rows' device, without NaN or +inf, and
    finite at every negative and counted target (a class drawn with probability 0 cannot be
    corrected for). Detached, in the accumulation dtype, contiguous."""
    if log_q is None:
        return None
    if not isinstance(log_q, Tensor) or log_q.dtype not in FLOAT_DTYPES or log_q.shape != (c,):
        got = describe(log_q) if isinstance(log_q, Tensor) else type(log_q).__name__
        raise ValueError(f"log_q must be a float tensor [C={c}] (log sampling probabilities), "
                         f"got {got}")  # fmt: skip
    check_same("input", h, "log_q", log_q, dtype=False)
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    lq = log_q.detach().to(cdt).contiguous()
    counted = y != ignore_index
    at_y = lq[torch.where(counted, y, torch.zeros_like(y))]
    broken = torch.isnan(lq) | (lq == math.inf)
    ok = ~broken.any() & torch.isfinite(lq[neg]).all() & (torch.isfinite(at_y) | ~counted).all()

    def message() -> str:
        if broken.any():
            cls = int(broken.nonzero()[0, 0])
            return f"log_q holds {lq[cls].item()} at class {cls}: NaN and +inf are not log-probabilities"
        bad_neg = ~torch.isfinite(lq[neg])
        if bad_neg.any():
            k = int(bad_neg.nonzero()[0, 0])
            return (f"log_q is -inf at negatives[{k}] = {int(neg[k])}: that class is never "
                    f"sampled, so it cannot be a negative (padding, or a zero count)")  # fmt: skip
        row = int((counted & ~torch.isfinite(at_y)).nonzero()[0, 0])
        return (f"log_q is -inf at the target {int(y[row])} of row {row}: a class the sampler "
                f"never draws has no correction (give it a count, or ignore the row)")  # fmt: skip

    check_values(ok, message, "log_q is NaN, +inf, or -inf at a negative or a target")
    return lq


def _check_flags(remove_accidental_hits: object, ignore_index: object, reduction: object) -> None:
    if not isinstance(remove_accidental_hits, bool):
        raise TypeError(f"remove_accidental_hits must be a bool, got {remove_accidental_hits!r}")
    if not is_int(ignore_index) or not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must be an int64, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")


def _autocast(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """``(a, b)`` in autocast's matmul dtype inside ``torch.autocast`` (float64 left alone, as
    PyTorch's ``linear`` does), and whether they were cast."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return a, b, False
    try:
        cast = _autocast_dtype(a.device)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to cast
        cast = None
    if cast is None or a.dtype == torch.float64:
        return a, b, False
    if a.is_floating_point() and b.is_floating_point():
        return a.to(cast), b.to(cast), True
    return a, b, False


def _backend(op: str, backend: Optional[str], h: Tensor, dt: Optional[int]) -> str:
    """The backend of a call with teacher width ``dt`` (None without a teacher)."""

    def why_not():
        if h.dtype == torch.float64:
            return "the kernels take fp32/fp16/bf16, got float64"
        widest = max(h.shape[1], dt or 0)
        if widest > limits.SAMPLED_MAX_DIM:
            return f"the kernels take hidden sizes <= {limits.SAMPLED_MAX_DIM}, got {widest}"
        return None

    return triton_or_torch(op, backend, h.device, why_not)


def sampled_softmax_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    negatives: Tensor,
    *,
    log_q: Optional[Tensor] = None,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Cross-entropy over each row's target and ``K`` negatives shared by the batch, without the
    ``[N, C]`` logits (nor ``[N, K]``).

    Args:
        input: ``[..., D]`` hidden states; the leading dims are ``N`` rows.
        weight: ``[C, D]`` the class (item) table, one row per class, padding row included.
        target: ``[...]`` (input's leading shape) class indices of any integer dtype, in
            ``[0, C)`` or ``ignore_index``.
        negatives: ``[K >= 1]`` integer class ids in ``[0, C)``, shared by every row, with
            replacement (duplicates count as many times as they occur), e.g.
            ``NegativeSampler.sample(K)``.
        log_q: ``[C]`` float, the log of each class's sampling probability
            (``NegativeSampler.log_q``), subtracted from every candidate's logit, the target's
            included (the logQ correction); None: uniform sampling, no correction. It must be
            finite at the negatives and the counted targets; no gradient flows to it.
        remove_accidental_hits: a negative equal to a row's target scores ``-inf`` in that row
            (it is the positive, not a negative).
        ignore_index: a target that counts for nothing.
        reduction: ``"mean"`` over the counted rows (NaN when none counts, as
            ``cross_entropy``), ``"sum"``, or ``"none"`` (the leading shape, 0 at ignored rows).
        backend: ``None``/``"auto"``, ``"triton"`` (fp32/fp16/bf16, ``D <= 256``) or
            ``"torch"`` (see :mod:`spnn_fast.backends`).

    Row ``i`` with target ``y`` scores ``s_c = input_i . weight[c] - log_q[c]`` for ``c`` in
    ``{y} + negatives`` and loses ``logsumexp(s) - s_y``. Gradients flow to ``input`` and
    ``weight`` (at the targets' and the negatives' rows), once: the backward is an op without
    a gradient of its own (no double backward, unlike ``cross_entropy``). The loss has
    ``input``'s dtype, or float32 under ``torch.autocast`` (whose dtype the dot products then
    run in), as :func:`linear_cross_entropy`'s; the sums are float32 (float64 for float64
    inputs).

    Raises:
        ValueError: mismatched shapes, dtypes or devices; a target or negative outside
            ``[0, C)``; ``log_q`` of the wrong shape, NaN or +inf, or -inf at a negative or a
            counted target; an unknown reduction; ``backend="triton"`` for what the kernels
            cannot run. TypeError: ``remove_accidental_hits`` not a bool.
    """
    _check_flags(remove_accidental_hits, ignore_index, reduction)
    input, weight, cast = _autocast(input, weight)
    out_dtype = torch.float32 if cast else getattr(input, "dtype", None)
    lead = input.shape[:-1] if isinstance(input, Tensor) else None
    h = _rows("input", input)
    check_matrix("weight", weight)
    check_same("input", h, "weight", weight)
    c, d = weight.shape
    if c < 1 or d != h.shape[1]:
        raise ValueError(f"weight must be [C >= 1, D={h.shape[1]}], got {tuple(weight.shape)}")
    y = _target_rows(target, lead, h)
    _check_target_values(y, c, ignore_index)
    neg = _check_negatives(negatives, c, h)
    lq = _check_log_q(log_q, c, h, y, neg, ignore_index)
    rows = _sampled_rows("sampled_softmax_loss", backend, h, weight, None, None, y, neg, lq,
                         1.0, 0.0, remove_accidental_hits, ignore_index)  # fmt: skip
    counted = y != ignore_index
    # The where keeps the 0/0 mean's infinite gradient off the ignored rows (their gradient is
    # 0, as cross_entropy's).
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead).to(out_dtype)
    if reduction == "sum":
        return rows.sum().to(out_dtype)
    return (rows.sum() / counted.sum().to(rows.dtype)).to(out_dtype)


def _sampled_rows(op, backend, h, w, ht, wt, y, neg, lq, temperature, alpha, hits, ignore_index):
    """The row losses from the registered op, on the backend the call picks."""
    from spnn_fast.ops.sampled_softmax import sampled_softmax_rows

    name = _backend(op, backend, h, None if ht is None else ht.shape[1])
    args = (float(temperature), float(alpha), bool(hits), int(ignore_index), name)
    return sampled_softmax_rows(h, w, ht, wt, y, neg, lq, *args)[0]


def sampled_distillation_loss(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_items: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    *,
    log_q: Optional[Tensor] = None,
    temperature: float = 2.0,
    alpha: Optional[float] = None,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`distillation_loss` over sampled candidates: ``(1 - alpha) * sampled CE + alpha *
    T^2 * KL(p_t || p_s)``, where ``p_s`` and ``p_t`` are the softmaxes at temperature ``T`` of
    the student's and the teacher's corrected logits over the SAME candidates per row (the
    target and the shared negatives, ``log_q`` subtracted, accidental hits removed).

    Arguments and checks are :func:`distillation_loss`'s (one teacher), plus ``negatives``,
    ``log_q`` and ``remove_accidental_hits`` as in :func:`sampled_softmax_loss`. ``target`` is
    required whatever ``alpha`` (it is every row's positive candidate); rows whose target is
    ``ignore_index`` count in neither term. The teacher is detached (no gradient); the default
    ``alpha`` is 0.5 with a teacher and 0 (the sampled cross-entropy) without. Reductions as
    :func:`distillation_loss`'s: ``"mean"`` over the counted rows (0, with zero gradients, when
    none counts), ``"sum"``, ``"none"``. Under ``torch.autocast`` the dot products run in its
    dtype; the loss is float32 (float64 for float64 inputs).
    """
    if isinstance(teacher_hidden, (list, tuple)) or isinstance(teacher_items, (list, tuple)):
        raise ValueError(
            "sampled_distillation_loss takes one teacher (tensors teacher_hidden [..., Dt] and "
            "teacher_items [C, Dt]); an ensemble runs with distillation_loss"
        )
    if alpha is None:
        alpha = 0.0 if teacher_hidden is None and teacher_items is None else 0.5
    if target is None:
        raise ValueError("target is required: each row's candidates are its target and the "
                         "negatives")  # fmt: skip
    if negatives is None:
        raise ValueError("negatives is required: an integer tensor [K] of class ids")
    _check_flags(remove_accidental_hits, ignore_index, reduction)
    student_hidden, student_items, _ = _autocast(student_hidden, student_items)
    teacher_hidden, teacher_items, _ = _autocast(teacher_hidden, teacher_items)
    hs, ht, wt, y, lead = _check_distill_args(
        student_hidden, student_items, teacher_hidden, teacher_items, target, temperature,
        alpha, ignore_index, reduction,
    )  # fmt: skip
    c = student_items.shape[0]
    neg = _check_negatives(negatives, c, hs)
    lq = _check_log_q(log_q, c, hs, y, neg, ignore_index)
    if alpha == 0:  # the sampled cross-entropy: the teacher is not read
        ht = wt = None
    rows = _sampled_rows("sampled_distillation_loss", backend, hs, student_items, ht, wt, y,
                         neg, lq, temperature, alpha, remove_accidental_hits, ignore_index)  # fmt: skip
    if reduction == "none":
        return rows.reshape(lead)
    from spnn_fast.reference.distill import reduce_rows

    return reduce_rows(rows, y, ignore_index, reduction)
