"""Functional API of spnn_fast: one function per op (validation, then dispatch to a backend)."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from spnn_fast import backends, limits

# --------------------------------------------------------------------------------------------
# Shared by every op: argument descriptions, and Triton-or-torch dispatch
# --------------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _triton_or_torch(op: str, backend: Optional[str], device: torch.device, why_not) -> str:
    """:func:`backends.select` among ("triton", "torch"); when it picks Triton and ``why_not()``
    names something the kernels cannot run, an explicit ``backend="triton"`` (any case) raises
    ValueError with that reason and every other request falls back to "torch"."""
    name = backends.select(op, backend, supported=("triton", "torch"), device=device)
    why = why_not() if name == "triton" else None
    if why is None:
        return name
    if isinstance(backend, str) and backend.lower() == "triton":
        raise ValueError(f"{op}: backend='triton' cannot run this call: {why}")
    return "torch"


# --------------------------------------------------------------------------------------------
# Semantic attention: semantic_attention
# --------------------------------------------------------------------------------------------


def _attn_check(q, k, v, key_padding_mask, timestamps, time_bias) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor [B, H, L, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D] (4-D), got {_describe(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {_describe(t)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, H, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, D = q.shape
    if D < 1:
        raise ValueError(f"q, k, v must have a head dim D >= 1, got {_describe(q)}")
    named = {"k": k, "v": v, "key_padding_mask": key_padding_mask, "timestamps": timestamps}
    named["time_bias"] = time_bias
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(
                f"key_padding_mask must be [B, L] = [{B}, {L}] for q of shape {tuple(q.shape)}, "
                f"got {_describe(key_padding_mask)}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool (True = real key), got {_describe(key_padding_mask)}"
            )
    if timestamps is not None:
        if tuple(timestamps.shape) != (B, L):
            raise ValueError(
                f"timestamps must be [B, L] = [{B}, {L}] for q of shape {tuple(q.shape)}, "
                f"got {_describe(timestamps)}"
            )
        if timestamps.dtype not in limits.ATTN_TIMESTAMP_DTYPES:
            raise ValueError(f"timestamps must be integer (seconds), got {_describe(timestamps)}")
    if time_bias is not None:
        if time_bias.dim() != 2 or time_bias.shape[0] != H:
            raise ValueError(
                f"time_bias must be [H, NB] with H = {H} (q of shape {tuple(q.shape)}), "
                f"got {_describe(time_bias)}"
            )
        if not 1 <= time_bias.shape[1] <= limits.MAX_TIME_BUCKETS:
            raise ValueError(
                f"time_bias must have 1 <= NB <= {limits.MAX_TIME_BUCKETS} buckets, "
                f"got {_describe(time_bias)}"
            )
        if not time_bias.is_floating_point():
            raise ValueError(f"time_bias must be floating point, got {_describe(time_bias)}")
        if timestamps is None:
            raise ValueError("timestamps [B, L] are required when time_bias is given")


def semantic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = True,
    timestamps: Optional[Tensor] = None,
    time_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-head self-attention with a learned per-head time-interval bias.

    Args:
        q, k, v: ``[B, H, L, D]``, one floating dtype.
        key_padding_mask: ``[B, L]`` bool, True where the key is a real event; None = all real.
        causal: query i attends to keys ``j <= i`` only.
        timestamps: ``[B, L]`` integer seconds; required with ``time_bias``, ignored without.
        time_bias: ``[H, NB]`` floating, ``1 <= NB <= 64``: the learned bias table.
        scale: multiplies ``<q, k>``; default ``1 / sqrt(D)``.
        backend: None / "auto" / "triton" / "torch" (see :mod:`spnn_fast.backends`).

    Returns:
        ``[B, H, L, D]`` in the dtype of q, where
        ``score[b,h,i,j] = scale * <q_i, k_j> + time_bias[h, min(NB - 1, bit_length(|t_i - t_j|))]``
        and ``out_i = sum_j softmax_j(score) * v_j`` over admissible keys. A row with no admissible
        key is zero and passes no gradient. Differentiable in q, k, v and time_bias; every
        gradient is deterministic.

    Raises:
        ValueError: wrong types, ranks, shapes, dtypes or devices (the message names the
            argument), a non-finite ``scale``, or ``backend="triton"`` with a head dim or dtype the
            kernels lack (D <= 128; float32/float16/bfloat16). The kernels are built for D in
            16/32/64/128; another D <= 128 runs them on q, k, v padded with zero columns.
    """
    _attn_check(q, k, v, key_padding_mask, timestamps, time_bias)
    B, H, L, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    scale = float(scale)

    def why_not():
        if D > limits.ATTN_HEAD_DIMS[-1] or q.dtype not in limits.ATTN_DTYPES:
            return (
                f"the kernels support head dims up to {limits.ATTN_HEAD_DIMS[-1]} and dtypes "
                f"float32/float16/bfloat16; got q of {_describe(q)}"
            )
        return None

    name = _triton_or_torch("semantic_attention", backend, q.device, why_not)
    if time_bias is None:
        timestamps = None
    elif timestamps.dtype != torch.int64:
        timestamps = timestamps.to(torch.int64)
    padded = D
    if name == "triton" and D not in limits.ATTN_HEAD_DIMS:
        # The kernels are compiled for D in 16/32/64/128: zero columns appended to q and k leave
        # every score unchanged (scale is that of the true D), those of v give output columns
        # that are cut off again, and autograd carries the gradients through the pad and the cut.
        padded = next(d for d in limits.ATTN_HEAD_DIMS if d >= D)
        q, k, v = (torch.nn.functional.pad(t, (0, padded - D)) for t in (q, k, v))
    from spnn_fast.ops.attention import semantic_attention_fwd

    out, _ = semantic_attention_fwd(
        q, k, v, key_padding_mask, timestamps, time_bias, bool(causal), scale, name
    )
    return out if padded == D else out[..., :D].contiguous()


# --------------------------------------------------------------------------------------------
# Distillation losses: distillation_loss, feature_distillation_loss
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


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
    if temperature < 1e-6:
        # Logits divided by T overflow float32 long before T reaches 0.
        raise ValueError(f"temperature must be >= 1e-6 (logits / T overflow), got {temperature}")
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
    def why_not():
        dims = [hs.shape[1]] + ([ht.shape[1]] if ht is not None else [])
        if hs.dtype == torch.float64:
            return "the kernels take fp32/fp16/bf16, got float64"
        if max(dims) > limits.DISTILL_MAX_DIM:
            return f"the kernels take hidden sizes <= {limits.DISTILL_MAX_DIM}, got {max(dims)}"
        return None

    return _triton_or_torch("distillation_loss", backend, hs.device, why_not)


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

    def why_not():
        if student_emb.dtype == torch.float64:
            return "the kernel takes fp32/fp16/bf16, got float64"
        if student_emb.shape[1] > limits.FEATURE_MAX_K:
            return f"the kernel takes K <= {limits.FEATURE_MAX_K}, got {student_emb.shape[1]}"
        return None

    name = _triton_or_torch("feature_distillation_loss", backend, student_emb.device, why_not)
    if name == "triton":
        return feature_distill_rows(student_emb, teacher_emb, weights, float(eps)).sum()
    return feature_distillation_loss_reference(student_emb, teacher_emb, weights, float(eps))


# --------------------------------------------------------------------------------------------
# Serving and evaluation over the catalogue: topk_scores, target_rank
# --------------------------------------------------------------------------------------------

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_catalogue(hidden: object, items: object) -> int:
    """Checks ``hidden [N, D]`` and ``items [V + 1, D]`` (V >= 1); returns V."""
    _check_matrix("hidden", hidden)
    _check_matrix("items", items)
    _check_same("hidden", hidden, "items", items)
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
        got = _describe(t) if isinstance(t, Tensor) else type(t).__name__
        shape = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"{name} must be an integer tensor {shape}, got {got}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {_describe(t)}")
    _check_same("hidden", hidden, name, t, dtype=False)
    return t


def _topk_backend(op: str, backend: Optional[str], hidden: Tensor, k: int) -> str:
    def why_not():
        if hidden.dtype == torch.float64:
            return "the kernels take fp32/fp16/bf16, got float64"
        if hidden.shape[1] > limits.TOPK_MAX_DIM:
            return f"the kernels take D <= {limits.TOPK_MAX_DIM}, got {hidden.shape[1]}"
        if k > limits.TOPK_MAX_K:
            return f"the kernel keeps k <= {limits.TOPK_MAX_K}, got k={k}"
        return None

    return _triton_or_torch(op, backend, hidden.device, why_not)


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

    _check_catalogue(hidden, items)
    _check_ids("target", target, hidden.shape[0], hidden)
    name = _topk_backend("target_rank", backend, hidden, 1)
    return _op(hidden.detach(), items.detach(), target, name)
