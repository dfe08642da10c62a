"""Serving and evaluation over the catalogue: ``topk_scores`` and ``target_rank``, without
the ``[N, V]`` score matrix."""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from spnn_fast import limits
from spnn_fast._checks import check_matrix, check_same, describe
from spnn_fast.functional._dispatch import check_values, triton_or_torch
from spnn_fast.ops._eager import traced
from spnn_fast.reference.topk import target_rank_chunked, topk_scores_chunked

__all__ = ["TopK", "target_rank", "topk_scores"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class TopK(NamedTuple):
    """The result of :func:`topk_scores`, named as ``torch.topk``'s: ``values, indices = ...``."""

    values: Tensor
    indices: Tensor


# A program exported with torch.export that returns a TopK names it when saved; loading finds it
# here, once spnn_fast is imported.
if hasattr(torch.utils._pytree, "_register_namedtuple"):
    torch.utils._pytree._register_namedtuple(TopK, serialized_type_name=f"{__name__}.TopK")


class _Ids(NamedTuple):
    """The item ids of a table of ``rows`` rows: every row but ``pad`` (None: no padding row)."""

    rows: int
    pad: Optional[int]

    @property
    def count(self) -> int:
        """V, the number of items."""
        return self.rows - (self.pad is not None)

    @property
    def rule(self) -> str:
        """The ids as messages say them."""
        if self.pad is None:
            return f"[0, V - 1] = [0, {self.rows - 1}] (no padding row)"
        if self.pad == 0:
            return f"[1, V] = [1, {self.rows - 1}] (0 is padding)"
        if self.pad == self.rows - 1:
            return f"[0, V - 1] = [0, {self.rows - 2}] (row {self.pad} is padding)"
        return f"[0, {self.rows - 1}] other than padding_idx={self.pad}"


def _item_ids(rows: int, padding_idx: object) -> _Ids:
    """The ids of a table of ``rows`` rows whose padding row is ``padding_idx`` (None, or an int
    in ``[-rows, rows)`` as ``nn.Embedding`` takes it)."""
    if padding_idx is None:
        return _Ids(rows, None)
    if (isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral)
            or not -rows <= padding_idx < rows):  # fmt: skip
        raise ValueError(
            f"padding_idx must be None (a table without a padding row) or the padding row, an "
            f"int in [-{rows}, {rows - 1}], got {padding_idx!r}"
        )
    return _Ids(rows, int(padding_idx) % rows)


def _check_catalogue(hidden: object, items: object, padding_idx: object) -> _Ids:
    """Checks ``hidden [N, D]`` and ``items [R, D]`` (V >= 1 items besides the padding row);
    returns the table's ids."""
    check_matrix("hidden", hidden)
    check_matrix("items", items)
    check_same("hidden", hidden, "items", items)
    rows = items.shape[0]
    ids = _item_ids(rows, padding_idx) if rows else _Ids(0, None)
    if ids.count < 1 or items.shape[1] != hidden.shape[1] or hidden.shape[1] < 1:
        shape = "[V, D]" if padding_idx is None else "[V + 1, D] (one row is padding)"
        raise ValueError(
            f"items must be {shape} with V >= 1 and D = hidden.shape[1] = {hidden.shape[1]} "
            f">= 1; got hidden {tuple(hidden.shape)}, items {tuple(items.shape)}, "
            f"padding_idx={padding_idx!r}"
        )
    return ids


def _check_ids(
    name: str, t: object, n: Optional[int], hidden: Tensor, arrays: bool = False
) -> Tensor:
    """A 1-D integer tensor (``[n]`` when n is given) on the device of ``hidden``; with
    ``arrays``, an integer numpy array too (as ``encode_batch`` takes), copied there."""
    kind = "tensor or numpy array" if arrays else "tensor"
    if arrays and isinstance(t, np.ndarray) and t.dtype.kind in "iu":
        t = torch.from_numpy(np.ascontiguousarray(t, dtype=np.int64)).to(hidden.device)
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _INT_DTYPES:
        if isinstance(t, np.ndarray):
            got = f"a {t.dtype} numpy array of shape {t.shape}"
        else:
            got = describe(t) if isinstance(t, Tensor) else type(t).__name__
        shape = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"{name} must be an integer {kind} {shape}, got {got}")
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


def _check_in(name: str, t: Tensor, ids: _Ids) -> None:
    """Every value of ``t`` is an item id of the table: one pass for the range (a padding row at
    either end of the table is a bound too), a second only for a padding row inside it."""
    if t.numel():
        lo, hi = (m.long() for m in torch.aminmax(t))  # int64: int8 < 1000 is False in int8
        ok = (lo >= 0) & (hi < ids.rows)
        if ids.pad == 0:
            ok = ok & (lo > 0)
        elif ids.pad == ids.rows - 1:
            ok = ok & (hi < ids.pad)
        elif ids.pad is not None and ids.pad <= torch.iinfo(t.dtype).max:
            ok = ok & (t != ids.pad).all()
        check_values(ok,
                     lambda: f"{name} must lie in {ids.rule}, got values in [{int(t.min())}, "
                     f"{int(t.max())}]", f"{name} must lie in {ids.rule}")  # fmt: skip


def _check_exclude(offsets: Tensor, items: Tensor, ids: _Ids) -> None:
    check_values(offsets[0] == 0,
                 lambda: f"exclude offsets must start at 0, got {int(offsets[0])}",
                 "exclude offsets must start at 0")  # fmt: skip
    step = offsets.diff()

    def decreasing() -> str:
        row = int((step < 0).nonzero()[0, 0])
        return (f"exclude offsets must be non-decreasing; offsets[{row + 1}] = "
                f"{int(offsets[row + 1])} < offsets[{row}] = {int(offsets[row])}")  # fmt: skip

    check_values((step >= 0).all(), decreasing, "exclude offsets must be non-decreasing")
    check_values(offsets[-1] == items.shape[0],
                 lambda: f"exclude offsets must end at len(item_ids) = {items.shape[0]}, got "
                 f"{int(offsets[-1])}", "exclude offsets must end at len(item_ids)")  # fmt: skip
    _check_in("exclude item_ids", items, ids)


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
    exclude: Optional[Tuple[object, object]] = None,
    padding_idx: Optional[int] = 0,
    backend: Optional[str] = None,
) -> TopK:
    """The ``k`` best items of each row, without the ``[N, V]`` score matrix.

    Args:
        hidden: ``[N, D]`` float16/bfloat16/float32/float64 (e.g. the last position's hidden state).
        items: ``[R, D]``, same dtype and device: row ``i`` is item id ``i``.
        k: an int in ``[1, V]`` (V: the items, the rows but the padding row).
        exclude: ``(offsets [N + 1], item_ids [E])``, integer tensors or numpy arrays: a CSR list
            of item ids not to return for each row (row ``n``'s are
            ``item_ids[offsets[n]:offsets[n + 1]]``; duplicates and any order allowed), or None.
        padding_idx: the padding row, never returned: 0 by default (``SPNN.item_emb.weight``,
            the convention of ``SPNN.score``, whose items are ``1..V``), another row (a negative
            one counts from the end, as in ``nn.Embedding``), or None for a table whose every
            row is an item (ids ``0..V - 1``).
        backend: ``None``/``"auto"``, ``"triton"`` (fp32/fp16/bf16, ``D <= 256``, ``k <= 128``) or
            ``"torch"``.

    Returns:
        :class:`TopK` ``(values [N, k], indices [N, k] int64)``, as ``torch.topk`` names them:
        the highest scores ``hidden @ items.T`` in the dtype of ``hidden`` (computed in it, as
        ``SPNN.score``) in descending order, equal scores by the lower item id. Where fewer than
        ``k`` items remain, the missing slots hold score ``-inf`` and index ``padding_idx``
        (-1 when None); an item scoring ``-inf`` is never returned. No gradient.

    The Triton kernel streams the catalogue in tiles keeping each row's best ``k`` in registers;
    the torch path works on chunks of at most ``spnn_fast.reference.topk.TOPK_BUDGET_BYTES``.

    Raises:
        ValueError: ``k`` not an int in ``[1, V]``; a ``padding_idx`` that is not a row; wrong
            shapes, dtypes or devices; a malformed ``exclude`` (offsets not starting at 0,
            decreasing, not ending at ``len(item_ids)``, ids that are not items); NaN or
            infinite values in ``hidden`` or ``items``; or ``backend="triton"`` with what the
            kernel cannot run.
    """
    from spnn_fast.ops.topk import topk_scores as _op

    ids = _check_catalogue(hidden, items, padding_idx)
    v = ids.count
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int in [1, V={v}], got {k!r}")
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    offsets = seen = None
    if exclude is not None:
        if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
            raise ValueError(
                f"exclude must be a pair (offsets [N + 1], item_ids) or None, got {exclude!r:.80}"
            )
        n = hidden.shape[0] + 1
        offsets = _check_ids("exclude offsets", exclude[0], n, hidden, arrays=True)
        seen = _check_ids("exclude item_ids", exclude[1], None, hidden, arrays=True)
        _check_exclude(offsets, seen, ids)
    _check_finite(hidden, items)
    name = _topk_backend("topk_scores", backend, hidden, int(k))
    args = (hidden.detach(), items.detach(), int(k), offsets, seen, ids.pad)
    if name == "torch" and not traced(args[:2]):  # the op's body, without its dispatch
        return TopK(*topk_scores_chunked(*args[:5], padding_idx=ids.pad))
    return TopK(*_op(*args, name))


def target_rank(
    hidden: Tensor,
    items: Tensor,
    target: Tensor,
    *,
    padding_idx: Optional[int] = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """The 1-based rank of each row's target among the items, without the score matrix.

    Args:
        hidden: ``[N, D]`` float16/bfloat16/float32/float64.
        items: ``[R, D]``, same dtype and device: row ``i`` is item id ``i``.
        target: ``[N]`` integer item ids.
        padding_idx: the padding row, never ranked (0 by default: items ``1..V``, as
            ``SPNN.item_emb.weight``), or None (every row is an item); as in :func:`topk_scores`.
        backend: ``None``/``"auto"``, ``"triton"`` (fp32/fp16/bf16, ``D <= 256``) or ``"torch"``.

    Returns:
        int64 ``[N]``: ``1 + #{items v != t : s_v >= s_t}`` with ``s = hidden @ items.T`` in
        the input dtype; ties count against the target, as in
        :func:`spnn_fast.metrics.ranks_from_scores` (the evaluation's rule). No gradient.

    On the torch path, a call whose rows fit the chunk budget with the whole table (at most
    ``TOPK_BUDGET_BYTES / (elem + 4)`` scores per row chunk of ``min(N, 256)`` rows) makes the
    very matmul of ``SPNN.score``, so its ranks equal ``ranks_from_scores(model.score(hidden)
    .float(), target)`` exactly. Otherwise, and on the GPU, the scores come from other products
    of the same numbers, which a BLAS or the kernel may round differently in the last bit: a
    rank can then move by the items whose score lies within that rounding of the target's.

    Raises:
        ValueError: wrong shapes, dtypes or devices; a ``padding_idx`` that is not a row; a
            non-integer target or one that is not an item; NaN or infinite values in ``hidden``
            or ``items``; ``backend="triton"`` with what the kernel cannot run.
    """
    from spnn_fast.ops.topk import target_rank as _op

    ids = _check_catalogue(hidden, items, padding_idx)
    _check_ids("target", target, hidden.shape[0], hidden)
    _check_in("target", target, ids)
    _check_finite(hidden, items)
    name = _topk_backend("target_rank", backend, hidden, 1)
    args = (hidden.detach(), items.detach(), target)
    if name == "torch" and not traced(args):  # the op's body, without its dispatch
        return target_rank_chunked(*args, padding_idx=ids.pad)
    return _op(*args, ids.pad, name)
