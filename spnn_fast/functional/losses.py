"""The losses: ``distillation_loss`` (CE + logit KD over an item catalogue),
``feature_distillation_loss`` and ``linear_cross_entropy`` (PyTorch's drop-in)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from spnn_fast import limits
from spnn_fast._checks import FLOAT_DTYPES, check_matrix, check_same, describe, is_int, is_real
from spnn_fast.functional._dispatch import check_values, triton_or_torch
from spnn_fast.reference.distill_ensemble import ENSEMBLES

__all__ = ["distillation_loss", "feature_distillation_loss", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _rows(name: str, t: object) -> Tensor:
    """``t [..., D]`` (floating, D >= 1) as ``[N, D]`` rows, N the product of the leading dims."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor [..., D], got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must be [..., D] with D >= 1, got {describe(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {describe(t)}")
    return t.reshape(-1, t.shape[-1])


def _target_rows(target: object, lead: torch.Size, hs: Tensor) -> Tensor:
    """``target`` (any integer dtype, shape ``lead``) as int64 ``[N]``."""
    ok = isinstance(target, Tensor) and not target.is_floating_point() and not target.is_complex()
    if not ok or target.dtype == torch.bool or target.shape != lead:
        got = describe(target) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target must be an integer tensor of class indices with the input's leading shape "
            f"{tuple(lead)}, got {got}"
        )
    check_same("input", hs, "target", target, dtype=False)
    return target.reshape(-1).to(torch.int64)


def _check_teacher(hs: Tensor, lead: torch.Size, v: int, ht: object, wt: object, at: str):
    """One teacher ``(ht [N, Dt], wt [V, Dt])``; ``at`` is its index in the lists ("[m]") or ""
    for a lone tensor, named in the errors."""
    name_h, name_w = f"teacher_hidden{at}", f"teacher_items{at}"
    if isinstance(ht, Tensor) and ht.shape[:-1] != lead:
        raise ValueError(
            f"{name_h} must be [..., Dt] with student_hidden's leading shape "
            f"{tuple(lead)}, got {describe(ht)}"
        )
    ht = _rows(name_h, ht)
    check_matrix(name_w, wt)
    check_same("student_hidden", hs, name_h, ht)
    check_same("student_hidden", hs, name_w, wt)
    dt = ht.shape[1]
    if wt.shape != (v, dt):
        raise ValueError(f"{name_w} must be [V={v}, Dt={dt}], got {name_w} {tuple(wt.shape)}")
    return ht, wt


def _check_teachers(hs: Tensor, lead: torch.Size, v: int, ht: object, wt: object):
    """``(ht [N, Dt], wt [V, Dt])`` for one teacher given as tensors, or the lists
    ``([ht_m [N, Dt_m]], [wt_m [V, Dt_m]])`` of M >= 1 teachers given as lists or tuples."""
    many_h, many_w = isinstance(ht, (list, tuple)), isinstance(wt, (list, tuple))
    if not many_h and not many_w:
        return _check_teacher(hs, lead, v, ht, wt, "")
    if not (many_h and many_w) or len(ht) != len(wt) or not ht:
        kinds = [f"{type(t).__name__} of {len(t)}" if isinstance(t, (list, tuple))
                 else type(t).__name__ for t in (ht, wt)]  # fmt: skip
        raise ValueError(
            f"teacher_hidden and teacher_items must both be tensors (one teacher) or both lists "
            f"of the same number M >= 1 of tensors (teacher m: teacher_hidden[m] [..., Dt_m], "
            f"teacher_items[m] [V, Dt_m]); got {kinds[0]} and {kinds[1]}"
        )
    pairs = [_check_teacher(hs, lead, v, h, w, f"[{m}]") for m, (h, w) in enumerate(zip(ht, wt))]
    return [h for h, _ in pairs], [w for _, w in pairs]


def _check_distill_args(hs, ws, ht, wt, target, temperature, alpha, ignore_index, reduction):
    """Validated ``(hs [N, Ds], teacher rows, teacher items, target [N] int64 or None, lead
    shape)``: the teacher's ``ht [N, Dt]`` and ``wt`` as given, lists of them for a list of
    teachers, or None."""
    lead = hs.shape[:-1] if isinstance(hs, Tensor) else None
    hs = _rows("student_hidden", hs)
    check_matrix("student_items", ws)
    check_same("student_hidden", hs, "student_items", ws)
    n, ds = hs.shape
    if ws.shape[0] < 1 or ws.shape[1] != ds:
        raise ValueError(
            f"student_items must be [V >= 1, Ds] with Ds = student_hidden.shape[-1] = {ds}; "
            f"got student_items {tuple(ws.shape)}"
        )
    v = ws.shape[0]
    if not is_real(temperature, 0.0, open_low=True):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature < 1e-6:
        # Logits divided by T overflow float32 long before T reaches 0.
        raise ValueError(f"temperature must be >= 1e-6 (logits / T overflow), got {temperature}")
    if not is_real(alpha, 0.0, 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    if not is_int(ignore_index) or not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must be an int64, got {ignore_index!r}")
    if alpha > 0 and (ht is None or wt is None):
        raise ValueError(
            f"alpha={alpha} > 0 distils from a teacher: teacher_hidden and teacher_items are required"
        )
    if ht is not None or wt is not None:
        if ht is None or wt is None:
            raise ValueError("teacher_hidden and teacher_items must be given together")
        ht, wt = _check_teachers(hs, lead, v, ht, wt)
    if alpha < 1 and target is None:
        raise ValueError(f"alpha={alpha} < 1 includes cross-entropy: target is required")
    if target is not None:
        target = _target_rows(target, lead, hs)
        _check_target_values(target, v, ignore_index)
    return hs, ht, wt, target, lead


def _check_target_values(target: Tensor, v: int, ignore_index: int) -> None:
    """Every target in ``[0, V)`` or ``ignore_index``. Eagerly a ValueError naming the first bad
    value (reading it waits for the device: this check, not the op, holds the one sync); under
    torch.compile an asynchronous device-side assert, which traces without a graph break."""
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    check_values(
        ~bad.any(),
        lambda: (
            f"target holds {int(target[bad][0])}, outside [0, V={v}) and not "
            f"ignore_index={ignore_index} ({int(bad.sum())} such rows)"
        ),
        f"target outside [0, V={v}) and not ignore_index",
    )


def _distill_backend(
    backend: Optional[str], hs: Tensor, dt: Optional[int], teachers: int = 1,
    ensemble: str = "distributions",
) -> str:  # fmt: skip
    """The backend of a call with teacher width ``dt`` (None without a teacher; the summed
    width of the concatenated teacher with ``ensemble="logits"``)."""

    def why_not():
        if teachers > 1 and ensemble == "distributions":
            return (
                f"the Triton kernels take one teacher or ensemble='logits'; got {teachers} "
                f"teachers with ensemble='distributions' (the torch path runs it)"
            )
        dims = [hs.shape[1]] + ([dt] if dt is not None else [])
        if hs.dtype == torch.float64:
            return "the kernels take fp32/fp16/bf16, got float64"
        if max(dims) > limits.DISTILL_MAX_DIM:
            summed = " (the teachers' widths summed)" if teachers > 1 and max(dims) == dt else ""
            return (
                f"the kernels take hidden sizes <= {limits.DISTILL_MAX_DIM}, got {max(dims)}"
                f"{summed}"
            )
        return None

    return triton_or_torch("distillation_loss", backend, hs.device, why_not)


def _mean_logits_teacher(hts: List[Tensor], wts: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """One teacher whose logits are the mean of the M teachers': ``cat_m(ht_m) / M`` against
    ``cat_m(wt_m)`` gives ``(1/M) sum_m ht_m @ wt_m.T``. Copies O((N + V) * sum Dt_m), never
    O(N * V); the teachers are detached, so no graph is recorded."""
    ht = torch.cat([h.detach() for h in hts], dim=1).div_(len(hts))
    return ht, torch.cat([w.detach() for w in wts], dim=1)


def distillation_loss(
    student_hidden: Tensor,
    student_items: Tensor,
    teacher_hidden: Union[Tensor, Sequence[Tensor], None] = None,
    teacher_items: Union[Tensor, Sequence[Tensor], None] = None,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    alpha: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    ensemble: str = "distributions",
    backend: Optional[str] = None,
) -> Tensor:
    """Fused linear cross-entropy + logit distillation over an item catalogue, from one teacher
    or an ensemble of teachers.

    Args:
        student_hidden: ``[..., Ds]`` student hidden states (one per scored position; leading
            dims are flattened into ``N`` rows).
        student_items: ``[V, Ds]`` student item embeddings; ``target`` indexes its rows.
        teacher_hidden: ``[..., Dt]`` (student_hidden's leading shape), teacher_items
            ``[V, Dt]``; required when ``alpha > 0``. Never receive a gradient. An ensemble of
            M >= 1 teachers is two lists (or tuples) of the same length: teacher m has
            ``teacher_hidden[m] [..., Dt_m]`` and ``teacher_items[m] [V, Dt_m]`` (the widths
            may differ between teachers).
        target: ``[...]`` (the leading shape) class indices of any integer dtype, in ``[0, V)``
            or ``ignore_index``; required when ``alpha < 1``. With ``alpha = 1`` it is
            optional and only marks ignored rows.
        temperature: ``T > 0`` of the distillation softmaxes.
        alpha: weight of the distillation term in ``[0, 1]``; default 0.5 with a teacher, 0
            (plain cross-entropy; :func:`linear_cross_entropy` is PyTorch's form of it) without.
        reduction: ``"mean"`` over counted rows (0, with zero gradients, when none counts),
            ``"sum"``, or ``"none"`` (the leading shape, 0 at ignored rows).
        ensemble: how M teachers combine: ``"distributions"`` (the mean of their
            temperature-softened distributions) or ``"logits"`` (the softmax of their mean
            logits). Both are the single-teacher loss when M = 1.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`spnn_fast.backends`).

    With ``z_s = student_hidden @ student_items.T`` and ``z_t = teacher_hidden @ teacher_items.T``
    (``[N, V]``, never held whole), each counted row contributes
    ``(1 - alpha) * CE(z_s, target) + alpha * T**2 * KL(p_t || softmax(z_s/T))`` with
    ``p_t = softmax(z_t/T)``. For M teachers, ``z_m = teacher_hidden[m] @ teacher_items[m].T``
    and ``p_t = (1/M) sum_m softmax(z_m/T)`` (``"distributions"``) or
    ``softmax((1/M) sum_m z_m / T)`` (``"logits"``). The Triton kernels stream the catalogue in
    tiles; they take one teacher, which the "logits" ensemble is (its teachers concatenated,
    within the kernels' width limit), so ``"distributions"`` with M >= 2 runs on the torch path.
    The torch path works in chunks of at most ``spnn_fast.reference.distill.LOGIT_BUDGET_BYTES``
    and keeps O(N * M) statistics. Gradients flow to ``student_hidden`` and ``student_items``,
    once: the backward is an op without a gradient of its own (no double backward). The loss is
    float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes, dtypes or devices (naming the teacher's index in a list),
            teacher lists of different lengths or empty, a target outside ``[0, V)`` other than
            ``ignore_index``, ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, a missing
            teacher with ``alpha > 0`` or a missing target with ``alpha < 1``, an unknown
            reduction or ensemble, ``backend="triton"`` for what the kernels cannot run.
    """
    from spnn_fast.ops.distill import distill_rows_call
    from spnn_fast.reference.distill import reduce_rows

    if alpha is None:
        alpha = 0.0 if teacher_hidden is None and teacher_items is None else 0.5
    if not isinstance(ensemble, str) or ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(ENSEMBLES)}; got {ensemble!r}")
    hs, ht, wt, target, lead = _check_distill_args(
        student_hidden, student_items, teacher_hidden, teacher_items, target,
        temperature, alpha, ignore_index, reduction,
    )  # fmt: skip
    if alpha == 0:  # plain fused linear cross-entropy: the teacher is not read
        ht = wt = None
    elif isinstance(ht, list) and len(ht) == 1:  # one teacher, whatever the ensemble
        ht, wt = ht[0], wt[0]
    args = (float(temperature), float(alpha), int(ignore_index))
    if isinstance(ht, list) and ensemble == "distributions":
        from spnn_fast.ops.distill_ensemble import distill_rows_ensemble

        _distill_backend(backend, hs, None, len(ht), ensemble)  # validates; the torch path runs
        loss_rows = distill_rows_ensemble(hs, student_items, ht, wt, target, *args)[0]
    else:
        teachers = len(ht) if isinstance(ht, list) else 1
        if teachers > 1:
            ht, wt = _mean_logits_teacher(ht, wt)
        dt = None if ht is None else ht.shape[1]
        name = _distill_backend(backend, hs, dt, teachers, ensemble)
        loss_rows = distill_rows_call(hs, student_items, ht, wt, target, *args, name)
    if reduction == "none":
        return loss_rows.reshape(lead)
    return reduce_rows(loss_rows, target, ignore_index, reduction)


def feature_distillation_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    weights: Tensor,
    *,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> Tensor:
    """``sum_i weights[i] * ||ln(student_emb[i]) - ln(teacher_emb[i])||^2`` (a scalar).

    Args:
        student_emb: ``[N, K]`` embedded student features; the only input that gets a gradient.
        teacher_emb: ``[N, K]`` embedded teacher features (same dtype as ``student_emb``).
        weights: ``[N]`` per-row weights (any float dtype).
        eps: layer-norm epsilon; ``ln`` is layer norm over ``K`` without affine parameters.
        backend: ``None``/``"auto"``, ``"triton"`` (``K <= 8192``) or ``"torch"``.

    Returns float32 (float64 for float64 inputs).
    """
    from spnn_fast.ops.feature_distill import feature_distill_rows
    from spnn_fast.reference.feature_distill import feature_distillation_loss_reference

    check_matrix("student_emb", student_emb)
    check_matrix("teacher_emb", teacher_emb)
    check_same("student_emb", student_emb, "teacher_emb", teacher_emb)
    if student_emb.shape != teacher_emb.shape or student_emb.shape[1] < 1:
        raise ValueError(
            f"student_emb and teacher_emb must both be [N, K >= 1]; got "
            f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}"
        )
    if not isinstance(weights, Tensor) or weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights must be a float tensor, got {weights!r:.80}")
    if weights.shape != (student_emb.shape[0],):
        raise ValueError(f"weights must be [N={student_emb.shape[0]}], got {describe(weights)}")
    check_same("student_emb", student_emb, "weights", weights, dtype=False)
    if not is_real(eps, 0.0, open_low=True):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")

    def why_not():
        if student_emb.dtype == torch.float64:
            return "the kernel takes fp32/fp16/bf16, got float64"
        if student_emb.shape[1] > limits.FEATURE_MAX_K:
            return f"the kernel takes K <= {limits.FEATURE_MAX_K}, got {student_emb.shape[1]}"
        return None

    name = triton_or_torch("feature_distillation_loss", backend, student_emb.device, why_not)
    if name == "triton":
        return feature_distill_rows(student_emb, teacher_emb, weights, float(eps)).sum()
    return feature_distillation_loss_reference(student_emb, teacher_emb, weights, float(eps))


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast gives a matmul on ``device`` here, or None outside autocast."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options: object = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the
    logits: PyTorch's :func:`torch.nn.functional.linear_cross_entropy`, on the fused kernels.

    Args:
        input: ``[..., D]``; the leading dims are rows.
        linear_weight: ``[C, D]``, one row per class.
        target: class indices ``[...]`` (input's leading shape), any integer dtype, in
            ``[0, C)`` or ``ignore_index``. Class probabilities raise NotImplementedError.
            A :class:`~spnn_fast.SequenceBatch`'s ``targets`` go in as they are: item ids where
            a position has a target (the rows of a table whose row ``i`` is item ``i``, such as
            ``nn.Embedding(V + 1, D, padding_idx=0).weight``) and -100 elsewhere.
        linear_bias: ``[C]`` or None.
        weight: ``[C]`` per-class rescaling, as in ``cross_entropy``.
        reduction: ``"mean"`` (over the counted rows, weighted by ``weight[target]``),
            ``"sum"`` or ``"none"`` (the leading shape).
        ignore_index: a target value that counts for nothing; None means -100, as in PyTorch.
        label_smoothing: in ``[0, 1]``: the target becomes ``(1 - s) * onehot + s / C``.
        options: PyTorch's chunking options; accepted and not needed (the logits are never
            formed here, whatever the options).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.

    Under ``torch.autocast`` the matmul runs in autocast's dtype, as ``linear`` would;
    accumulation and the loss are float32 (float64 for float64 inputs). Gradients flow to
    ``input``, ``linear_weight`` and ``linear_bias``; with a bias the fused op sees ``[input,
    1]`` against ``[linear_weight, linear_bias]``.
    """
    if isinstance(target, Tensor) and target.is_floating_point():
        raise NotImplementedError(
            "linear_cross_entropy takes class indices; class-probability targets are not supported"
        )
    ignore_index = -100 if ignore_index is None else ignore_index
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    if not is_real(label_smoothing, 0.0, 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(input, Tensor) or not isinstance(linear_weight, Tensor):
        raise ValueError("input and linear_weight must be tensors")
    cast = _autocast_dtype(input.device)
    if input.dtype == torch.float64:  # autocast leaves float64 alone, as PyTorch's does
        cast = None
    # The loss's dtype: the logits' (the inputs'), or float32 under autocast, as in PyTorch.
    out_dtype = input.dtype if cast is None else torch.float32
    if cast is not None and input.is_floating_point() and linear_weight.is_floating_point():
        input, linear_weight = input.to(cast), linear_weight.to(cast)
        linear_bias = None if linear_bias is None else linear_bias.to(cast)
    check_matrix("linear_weight", linear_weight)
    lead = input.shape[:-1]
    h = _rows("input", input)
    check_same("input", h, "linear_weight", linear_weight)
    c, d = linear_weight.shape
    if h.shape[1] != d:
        raise ValueError(
            f"linear_weight must be [C, D={h.shape[1]}], got {tuple(linear_weight.shape)}"
        )
    for name, t in (("linear_bias", linear_bias), ("weight", weight)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (c,)):
            got = describe(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [C={c}] tensor, got {got}")
        if t is not None:
            check_same("input", h, name, t, dtype=False)
    w_table = linear_weight
    if linear_bias is not None:  # the bias as one more input column
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        w_table = torch.cat([linear_weight, linear_bias.to(linear_weight.dtype)[:, None]], dim=1)
    nll = distillation_loss(h, w_table, target=_target_rows(target, lead, h), alpha=0.0,
                            ignore_index=ignore_index, reduction="none", backend=backend)  # fmt: skip
    y = target.reshape(-1).to(torch.int64)
    counted = y != ignore_index
    safe = torch.where(counted, y, torch.zeros_like(y))
    w_y = nll.new_ones(()) if weight is None else weight.to(nll.dtype)[safe]
    rows = nll * w_y
    if label_smoothing > 0:
        # sum_c w_c * -log p_c = lse * sum_c w_c - sum_c w_c z_c, and sum_c w_c z_c is one dot
        # product with the weighted sum of the class rows: still no logits.
        wc = nll.new_ones(c) if weight is None else weight.to(nll.dtype)
        z_y = (h.to(nll.dtype) * w_table.to(nll.dtype)[safe]).sum(-1)
        lse = nll + z_y
        smooth = lse * wc.sum() - h.to(nll.dtype) @ (wc @ w_table.to(nll.dtype))
        rows = (1.0 - label_smoothing) * rows + (label_smoothing / c) * smooth
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead).to(out_dtype)
    if reduction == "sum":
        return rows.sum().to(out_dtype)
    # The weighted mean over counted rows; 0/0 (nothing counted) is NaN, as in PyTorch.
    denom = counted.sum() if weight is None else torch.where(counted, w_y, 0).sum()
    return (rows.sum() / denom.to(rows.dtype)).to(out_dtype)
