"""Serving and evaluation over the catalogue: ``topk_scores`` and ``target_rank``, without
the ``[N, V]`` score matrix."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from spnn_fast import limits
from spnn_fast._checks import check_matrix, check_same, describe
from spnn_fast.functional._dispatch import check_values, triton_or_torch

__all__ = ["target_rank", "topk_scores"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_catalogue(hidden: object, items: object) -> int:
    """Checks ``hidden [N, D]`` and ``items [V + 1, D]`` (V >= 1); returns V."""
    check_matrix("hidden", hidden)
    check_matrix("items", items)
    check_same("hidden", hidden, "items", items)
    if items.shape[0] < 2 or items.shape[1] != hidden.shape[1] or hidden.shape[1] < 1:
        raise ValueError(
            f"items must be [V + 1, D] with V >= 1 (row 0 = padding) and D = hidden.shape[1] "
            f"= {hidden.shape[1]} >= 1; got hidden {tuple(hidden.shape)}, items "
            f"{tuple(items.shape)}"
        )
    return items.shape[0] - 1


def _check_ids(name: str, t: object, n: Optional[int], hidden: Tensor) -> Tensor:
    """A 1-D integer tensor (``[n]`` when n is given) on the device of ``hidden``."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _INT_DTYPES:
        got = describe(t) if isinstance(t, Tensor) else type(t).__name__
        shape = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"{name} must be an integer tensor {shape}, got {got}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {describe(t)}")
    check_same("hidden", hidden, name, t, dtype=False)
    return t


def _check_finite(hidden: Tensor, items: Tensor) -> None:
    for name, t in (("hidden", hidden), ("items", items)):
        if t.numel() == 0:
            continue
        # min and max propagate NaN and show infinities, in one pass without temporaries
        lo, hi = torch.aminmax(t)
        check_values(
            torch.isfinite(lo) & torch.isfinite(hi),
            lambda t=t, name=name: (
                f"{name} holds NaN or infinite values (first in row "
                f"{int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])}); scores would not rank"
            ),
            f"{name} holds NaN or infinite values",
        )


def _check_exclude(offsets: Tensor, ids: Tensor, v: int) -> None:
    check_values(offsets[0] == 0,
                 lambda: f"exclude offsets must start at 0, got {int(offsets[0])}",
                 "exclude offsets must start at 0")  # fmt: skip
    step = offsets.diff()

    def decreasing() -> str:
        row = int((step < 0).nonzero()[0, 0])
        return (f"exclude offsets must be non-decreasing; offsets[{row + 1}] = "
                f"{int(offsets[row + 1])} < offsets[{row}] = {int(offsets[row])}")  # fmt: skip

    check_values((step >= 0).all(), decreasing, "exclude offsets must be non-decreasing")
    check_values(offsets[-1] == ids.shape[0],
                 lambda: f"exclude offsets must end at len(item_ids) = {ids.shape[0]}, got "
                 f"{int(offsets[-1])}", "exclude offsets must end at len(item_ids)")  # fmt: skip
    if ids.numel():
        check_values(((ids >= 1) & (ids <= v)).all(),
                     lambda: f"exclude item_ids must lie in [1, V] = [1, {v}] (0 is padding), got "
                     f"values in [{int(ids.min())}, {int(ids.max())}]",
                     f"exclude item_ids must lie in [1, V={v}]")  # fmt: skip


def _check_target(target: Tensor, v: int) -> None:
    if target.numel():
        check_values(((target >= 1) & (target <= v)).all(),
                     lambda: f"target must lie in [1, V] = [1, {v}] (0 is padding), got values in "
                     f"[{int(target.min())}, {int(target.max())}]",
                     f"target must lie in [1, V={v}]")  # fmt: skip


def _topk_backend(op: str, backend: Optional[str], hidden: Tensor, k: int) -> str:
    def why_not():
        if hidden.dtype == torch.float64:
            return "the kernels take fp32/fp16/bf16, got float64"
        if hidden.shape[1] > limits.TOPK_MAX_DIM:
            return f"the kernels take D <= {limits.TOPK_MAX_DIM}, got {hidden.shape[1]}"
        if k > limits.TOPK_MAX_K:
            return f"the kernel keeps k <= {limits.TOPK_MAX_K}, got k={k}"
        return None

    return triton_or_torch(op, backend, hidden.device, why_not)


def topk_scores(
    hidden: Tensor,
    items: Tensor,
    k: int,
    *,
    exclude: Optional[tuple] = None,
    backend: Optional[str] = None,
) -> tuple:
    """The ``k`` best items of each row, without the ``[N, V]`` score matrix.

    Args:
        hidden: ``[N, D]`` float16/bfloat16/float32/float64 (e.g. the last position's hidden state).
        items: ``[V + 1, D]``, same dtype and device: row ``i`` is item id ``i``; row 0 is padding
            and is never returned (``SPNN.item_emb.weight``, the convention of ``SPNN.score``).
        k: an int in ``[1, V]``.
        exclude: ``(offsets [N + 1], item_ids [E])``, a CSR list of ids in ``[1, V]`` not to return
            for each row (row ``n``'s are ``item_ids[offsets[n]:offsets[n + 1]]``; duplicates and
            any order allowed), or None.
        backend: ``None``/``"auto"``, ``"triton"`` (fp32/fp16/bf16, ``D <= 256``, ``k <= 128``) or
            ``"torch"``.

    Returns:
        ``(values [N, k] float32, indices [N, k] int64)``: the highest scores ``hidden @ items.T``
        (computed in the input dtype, as ``SPNN.score``) in descending order, equal scores by the
        lower item id. Where fewer than ``k`` items remain, the missing slots hold index 0 and
        score ``-inf``; an item scoring ``-inf`` is never returned. No gradient.

    The Triton kernel streams the catalogue in tiles keeping each row's best ``k`` in registers;
    the torch path works on chunks of at most ``spnn_fast.reference.topk.TOPK_BUDGET_BYTES``.

    Raises:
        ValueError: ``k`` not an int in ``[1, V]``; wrong shapes, dtypes or devices; a malformed
            ``exclude`` (offsets not starting at 0, decreasing, not ending at ``len(item_ids)``,
            ids outside ``[1, V]``); NaN or infinite values in ``hidden`` or ``items``; or
            ``backend="triton"`` with what the kernel cannot run.
    """
    from spnn_fast.ops.topk import topk_scores as _op

    v = _check_catalogue(hidden, items)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int in [1, V={v}], got {k!r}")
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    offsets = ids = None
    if exclude is not None:
        if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
            raise ValueError(
                f"exclude must be a pair (offsets [N + 1], item_ids) or None, got {exclude!r:.80}"
            )
        offsets = _check_ids("exclude offsets", exclude[0], hidden.shape[0] + 1, hidden)
        ids = _check_ids("exclude item_ids", exclude[1], None, hidden)
        _check_exclude(offsets, ids, v)
    _check_finite(hidden, items)
    name = _topk_backend("topk_scores", backend, hidden, int(k))
    return _op(hidden.detach(), items.detach(), int(k), offsets, ids, name)


def target_rank(
    hidden: Tensor, items: Tensor, target: Tensor, *, backend: Optional[str] = None
) -> Tensor:
    """The 1-based rank of each row's target among items ``1..V``, without the score matrix.

    Args:
        hidden: ``[N, D]`` float16/bfloat16/float32/float64.
        items: ``[V + 1, D]``, same dtype and device (row 0 = padding, never ranked).
        target: ``[N]`` integer item ids in ``[1, V]``.
        backend: ``None``/``"auto"``, ``"triton"`` (fp32/fp16/bf16, ``D <= 256``) or ``"torch"``.

    Returns:
        int64 ``[N]``: ``1 + #{v in 1..V, v != t : s_v >= s_t}`` with ``s = hidden @ items.T`` in
        the input dtype; ties count against the target, as in
        :func:`spnn_fast.metrics.ranks_from_scores` (the evaluation's rule). No gradient.

    On the torch path, a call whose rows fit the chunk budget with the whole table (at most
    ``TOPK_BUDGET_BYTES / (elem + 4)`` scores per row chunk of ``min(N, 256)`` rows) makes the
    very matmul of ``SPNN.score``, so its ranks equal ``ranks_from_scores(model.score(hidden)
    .float(), target)`` exactly. Otherwise, and on the GPU, the scores come from other products
    of the same numbers, which a BLAS or the kernel may round differently in the last bit: a
    rank can then move by the items whose score lies within that rounding of the target's.

    Raises:
        ValueError: wrong shapes, dtypes or devices; a non-integer target or one outside
            ``[1, V]``; NaN or infinite values in ``hidden`` or ``items``; ``backend="triton"``
            with what the kernel cannot run.
    """
    from spnn_fast.ops.topk import target_rank as _op

    v = _check_catalogue(hidden, items)
    _check_ids("target", target, hidden.shape[0], hidden)
    _check_target(target, v)
    _check_finite(hidden, items)
    name = _topk_backend("target_rank", backend, hidden, 1)
    return _op(hidden.detach(), items.detach(), target, name)
