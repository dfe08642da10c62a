"""Functional API of spnn_fast: one function per op (validation, then dispatch to a backend)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spnn_fast import backends

# --------------------------------------------------------------------------------------------
# Distillation losses: distillation_loss, feature_distillation_loss
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _check_matrix(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {_describe(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {_describe(t)}")
    return t


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{name_a} ({_describe(a)}) and {name_b} ({_describe(b)}) are on different devices"
        )
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_a} ({_describe(a)}) and {name_b} ({_describe(b)}) differ in dtype")


def _check_distill_args(hs, ws, ht, wt, target, temperature, alpha, ignore_index, reduction):
    _check_matrix("student_hidden", hs)
    _check_matrix("student_items", ws)
    _check_same("student_hidden", hs, "student_items", ws)
    n, ds = hs.shape
    if ws.shape[0] < 1 or ws.shape[1] != ds or ds < 1:
        raise ValueError(
            f"student_items must be [V >= 1, Ds] with Ds = student_hidden.shape[1] = {ds} >= 1; "
            f"got student_hidden {tuple(hs.shape)}, student_items {tuple(ws.shape)}"
        )
    v = ws.shape[0]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if alpha > 0 and (ht is None or wt is None):
        raise ValueError(
            f"alpha={alpha} > 0 distils from a teacher: teacher_hidden and teacher_items are required"
        )
    if ht is not None or wt is not None:
        if ht is None or wt is None:
            raise ValueError("teacher_hidden and teacher_items must be given together")
        _check_matrix("teacher_hidden", ht)
        _check_matrix("teacher_items", wt)
        _check_same("student_hidden", hs, "teacher_hidden", ht)
        _check_same("student_hidden", hs, "teacher_items", wt)
        dt = ht.shape[1]
        if ht.shape[0] != n or wt.shape != (v, dt) or dt < 1:
            raise ValueError(
                f"teacher_hidden must be [N={n}, Dt] and teacher_items [V={v}, Dt]; got "
                f"teacher_hidden {tuple(ht.shape)}, teacher_items {tuple(wt.shape)}"
            )
    if alpha < 1 and target is None:
        raise ValueError(f"alpha={alpha} < 1 includes cross-entropy: target is required")
    if target is not None:
        if not isinstance(target, Tensor) or target.dtype != torch.int64 or target.shape != (n,):
            got = _describe(target) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"target must be an int64 tensor of shape [N={n}], got {got}")
        _check_same("student_hidden", hs, "target", target, dtype=False)


def _distill_backend(backend: Optional[str], hs: Tensor, ht: Optional[Tensor]) -> str:
    name = backends.select("distillation_loss", backend, ("triton", "torch"), hs.device)
    if name != "triton":
        return name
    dims = [hs.shape[1]] + ([ht.shape[1]] if ht is not None else [])
    why = None
    if hs.dtype == torch.float64:
        why = "the kernels take fp32/fp16/bf16, got float64"
    elif max(dims) > 256:
        why = f"the kernels take hidden sizes <= 256, got {max(dims)}"
    if why is None:
        return name
    if backend == "triton":
        raise ValueError(f"distillation_loss: backend='triton' cannot run this call: {why}")
    return "torch"


def distillation_loss(
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
    backend: Optional[str] = None,
) -> Tensor:
    """Fused linear cross-entropy + logit distillation over an item catalogue.

    Args:
        student_hidden: ``[N, Ds]`` student hidden states (one per scored position).
        student_items: ``[V, Ds]`` student item embeddings; ``target`` indexes its rows.
        teacher_hidden: ``[N, Dt]``, teacher_items ``[V, Dt]``; required when ``alpha > 0``.
            Never receive a gradient.
        target: ``[N]`` int64 in ``[0, V)`` or ``ignore_index``; required when ``alpha < 1``.
            With ``alpha = 1`` it is optional and only marks ignored rows.
        temperature: ``T > 0`` of the distillation softmaxes.
        alpha: weight of the distillation term in ``[0, 1]``.
        reduction: ``"mean"`` over counted rows (0, with zero gradients, when none counts),
            ``"sum"``, or ``"none"`` (``[N]``, 0 at ignored rows).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`spnn_fast.backends`).

    With ``z_s = student_hidden @ student_items.T`` and ``z_t = teacher_hidden @ teacher_items.T``
    (``[N, V]``, never held whole), each counted row contributes
    ``(1 - alpha) * CE(z_s, target) + alpha * T**2 * KL(softmax(z_t/T) || softmax(z_s/T))``.
    The Triton kernels stream the catalogue in tiles; the torch path works in chunks of at most
    ``spnn_fast.reference.distill.LOGIT_BUDGET_BYTES``. Gradients flow to ``student_hidden`` and
    ``student_items``. The loss is float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a target outside ``[0, V)`` other than
            ``ignore_index``, ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, a missing teacher
            with ``alpha > 0`` or a missing target with ``alpha < 1``, an unknown reduction.
    """
    from spnn_fast.ops.distill import distill_rows
    from spnn_fast.reference.distill import reduce_rows

    _check_distill_args(
        student_hidden, student_items, teacher_hidden, teacher_items, target,
        temperature, alpha, ignore_index, reduction,
    )  # fmt: skip
    if alpha == 0:  # plain fused linear cross-entropy: the teacher is not read
        teacher_hidden = teacher_items = None
    name = _distill_backend(backend, student_hidden, teacher_hidden)
    loss_rows = distill_rows(
        student_hidden, student_items, teacher_hidden, teacher_items, target,
        float(temperature), float(alpha), int(ignore_index), name,
    )[0]  # fmt: skip
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

    _check_matrix("student_emb", student_emb)
    _check_matrix("teacher_emb", teacher_emb)
    _check_same("student_emb", student_emb, "teacher_emb", teacher_emb)
    if student_emb.shape != teacher_emb.shape or student_emb.shape[1] < 1:
        raise ValueError(
            f"student_emb and teacher_emb must both be [N, K >= 1]; got "
            f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}"
        )
    if not isinstance(weights, Tensor) or weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weights must be a float tensor, got {weights!r:.80}")
    if weights.shape != (student_emb.shape[0],):
        raise ValueError(f"weights must be [N={student_emb.shape[0]}], got {_describe(weights)}")
    _check_same("student_emb", student_emb, "weights", weights, dtype=False)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    name = backends.select(
        "feature_distillation_loss", backend, ("triton", "torch"), student_emb.device
    )
    if name == "triton":
        why = None
        if student_emb.dtype == torch.float64:
            why = "the kernel takes fp32/fp16/bf16, got float64"
        elif student_emb.shape[1] > 8192:
            why = f"the kernel takes K <= 8192, got {student_emb.shape[1]}"
        if why is not None and backend == "triton":
            raise ValueError(
                f"feature_distillation_loss: backend='triton' cannot run this call: {why}"
            )
        if why is None:
            return feature_distill_rows(student_emb, teacher_emb, weights, float(eps)).sum()
    return feature_distillation_loss_reference(student_emb, teacher_emb, weights, float(eps))
