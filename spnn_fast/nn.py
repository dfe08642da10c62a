"""Modules of spnn_fast: each ``forward`` is one call into :mod:`spnn_fast.functional`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from spnn_fast._checks import check_int
from spnn_fast.functional.attention import _UNSET, moved_key_padding_mask
from spnn_fast.limits import MAX_TIME_BUCKETS


def _check_sizes(owner: str, **sizes: object) -> None:
    """TypeError for a size that is not an integer (bool and float included), ValueError < 1."""
    for name, v in sizes.items():
        check_int(f"{owner}: {name}", v, 1)


# --------------------------------------------------------------------------------------------
# Semantic attention: SemanticAttention
# --------------------------------------------------------------------------------------------


class SemanticAttention(nn.Module):
    """The semantic perception layer: multi-head self-attention with a learned time bias per head.

    ``forward(x [B, L, d_model], key_mask [B, L] bool = None (True = the key takes part),
    timestamps [B, L] int = None)
    -> [B, L, d_model]``: a fused q/k/v projection, :func:`spnn_fast.functional.semantic_attention`
    with this module's ``time_bias [n_heads, num_time_buckets]`` (used when timestamps are given),
    the output projection, dropout.

    ``backend`` (None / "auto" / "triton" / "torch") is passed to the op; None follows
    ``SPNN_FAST_BACKEND`` or picks the fastest available.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        num_time_buckets: int = 32,
        causal: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_sizes("SemanticAttention", d_model=d_model, n_heads=n_heads,
                     num_time_buckets=num_time_buckets)  # fmt: skip
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if not 1 <= num_time_buckets <= MAX_TIME_BUCKETS:
            raise ValueError(
                f"num_time_buckets={num_time_buckets} must be in [1, {MAX_TIME_BUCKETS}]"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.num_time_buckets, self.causal, self.backend = num_time_buckets, causal, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Zero at start: every interval weighs the same until training says otherwise.
        self.time_bias = nn.Parameter(torch.zeros(n_heads, num_time_buckets))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        key_mask: Optional[Tensor] = None,
        timestamps: Optional[Tensor] = None,
        *,
        key_padding_mask: object = _UNSET,
    ) -> Tensor:
        """Self-attention over a batch of sequences.

        Args:
            x: ``[B, L, d_model]`` floating.
            key_mask: ``[B, L]`` bool, True where the position is a real event that may be
                attended to (SDPA's boolean-mask polarity); None = every position. Passing
                ``key_padding_mask=`` (``nn.MultiheadAttention``'s name, True = padding) raises
                a TypeError rather than silently inverting the mask.
            timestamps: ``[B, L]`` integer seconds; with them the learned ``time_bias`` of the
                gap bucket between two events is added to their score (without, no bias).

        Returns:
            ``[B, L, d_model]`` in the dtype of ``x``.
        """
        from spnn_fast.functional import semantic_attention

        if key_padding_mask is not _UNSET:
            raise moved_key_padding_mask("SemanticAttention.forward()")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, {self.d_model}], got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = semantic_attention(
            q,
            k,
            v,
            key_mask=key_mask,
            causal=self.causal,
            timestamps=timestamps,
            time_bias=self.time_bias if timestamps is not None else None,
            backend=self.backend,
        )
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, L, self.d_model)))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, "
            f"num_time_buckets={self.num_time_buckets}, causal={self.causal}, "
            f"dropout={self.dropout.p}, backend={self.backend!r}"
        )


# --------------------------------------------------------------------------------------------
# Distillation: DistillationLoss, KnowledgeDetector, FeatureDistiller
# --------------------------------------------------------------------------------------------


class DistillationLoss(nn.Module):
    """Fused linear cross-entropy + logit distillation; see
    :func:`spnn_fast.functional.distillation_loss` for the arguments of ``forward``.

    ``alpha = 0`` is the plain fused linear cross-entropy (no teacher needed). Lists of teacher
    tensors are an ensemble, combined as ``ensemble`` says.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: Optional[float] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: Optional[str] = None,
        ensemble: str = "distributions",
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.ensemble = ensemble

    def forward(
        self,
        student_hidden: Tensor,
        student_items: Tensor,
        teacher_hidden: Union[Tensor, Sequence[Tensor], None] = None,
        teacher_items: Union[Tensor, Sequence[Tensor], None] = None,
        target: Optional[Tensor] = None,
    ) -> Tensor:
        """The loss of :func:`spnn_fast.functional.distillation_loss`: hidden states
        ``[..., Ds]`` / ``[..., Dt]`` (or a list of M teachers' ``[..., Dt_m]``), item tables
        ``[V, Ds]`` / ``[V, Dt]`` (or the M teachers' ``[V, Dt_m]``), integer ``target`` of the
        leading shape (``ignore_index`` where a row does not count); float32, a scalar or the
        leading shape with ``reduction="none"``."""
        from spnn_fast.functional import distillation_loss

        return distillation_loss(
            student_hidden, student_items, teacher_hidden, teacher_items, target,
            temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
            reduction=self.reduction, ensemble=self.ensemble, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"ensemble={self.ensemble!r}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """PyTorch's :class:`torch.nn.LinearCrossEntropyLoss` on the fused kernels: a ``Linear(in_features,
    num_classes)`` whose logits feed ``cross_entropy``, never formed whole.

    ``forward(input [..., in_features], target [...] class indices) -> loss`` is one call to
    :func:`spnn_fast.functional.linear_cross_entropy`; the arguments, the parameter names
    (``linear.weight``, ``linear.bias``, the ``weight`` buffer) and so the state dicts are
    PyTorch's. ``out_features`` (a K-dimensional loss) must be ``()``; ``options`` is accepted
    and not needed. ``backend`` picks the implementation (see :mod:`spnn_fast.backends`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options: object = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_sizes("LinearCrossEntropyLoss", in_features=in_features, num_classes=num_classes)
        if tuple(out_features) != ():
            raise NotImplementedError("LinearCrossEntropyLoss: out_features must be ()")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        self.num_classes, self.out_features = num_classes, ()
        self.reduction, self.ignore_index = reduction, ignore_index
        self.label_smoothing, self.options, self.backend = label_smoothing, options, backend
        self.register_buffer("weight", weight)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``linear(input)`` against ``target``: ``input [..., in_features]``
        floating, ``target [...]`` integer class indices in ``[0, num_classes)`` or
        ``ignore_index``; a scalar, or the leading shape with ``reduction="none"``."""
        from spnn_fast.functional import linear_cross_entropy

        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


def _check_feats(name: str, feats: Tensor, dim: int, mask: object = ...) -> None:
    """``feats`` must be [B, L, dim]; and ``mask``, when passed (None included), bool [B, L]."""
    if not isinstance(feats, Tensor) or feats.dim() != 3 or feats.shape[-1] != dim:
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"{name} must be [B, L, {dim}], got {got}")
    if mask is not ... and (
        not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != feats.shape[:2]
    ):
        got = (
            f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        )
        raise ValueError(f"mask must be a bool tensor [B, L] = {tuple(feats.shape[:2])}, got {got}")


class KnowledgeDetector(nn.Module):
    """Attention-pooling scorer that marks the key positions of a teacher's intermediate layer.

    ``s[b, i] = w^T tanh(W x[b, i] + c)``; :meth:`weights` is the softmax of ``s`` over each
    sequence's real positions (``mask`` True), 0 at padding, all zeros for a sequence with no real
    position. :meth:`pool` is ``sum_i a[b, i] x[b, i]``: the teacher trains the detector through it
    (an auxiliary next-item loss on the pooled vector), so the detector learns which positions
    carry what predicts the next item.

    Args:
        d_teacher: feature size of the teacher layer it reads.
        d_hidden: size of the scoring layer.
    """

    def __init__(self, d_teacher: int, d_hidden: int = 64) -> None:
        super().__init__()
        _check_sizes("KnowledgeDetector", d_teacher=d_teacher, d_hidden=d_hidden)
        self.d_teacher = d_teacher
        self.d_hidden = d_hidden
        self.proj = nn.Linear(d_teacher, d_hidden)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def scores(self, feats: Tensor) -> Tensor:
        """Raw scores ``[B, L]`` for ``feats [B, L, d_teacher]``."""
        return self.score(torch.tanh(self.proj(feats))).squeeze(-1)

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """The weights ``a [B, L]``: same as :meth:`weights`."""
        _check_feats("feats", feats, self.d_teacher, mask)
        s = self.scores(feats)
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        # A row of padding only gives a uniform softmax, which the mask then zeroes: never NaN.
        return torch.softmax(s, dim=-1) * mask

    def weights(self, feats: Tensor, mask: Tensor) -> Tensor:
        """Softmax of the scores over real positions, ``[B, L]`` (0 at padding)."""
        return self(feats, mask)

    def pool(self, feats: Tensor, mask: Tensor) -> Tensor:
        """``sum_i a[b, i] feats[b, i]``: ``[B, d_teacher]``."""
        return torch.einsum("bl,bld->bd", self(feats, mask), feats)

    def extra_repr(self) -> str:
        return f"d_teacher={self.d_teacher}, d_hidden={self.d_hidden}"


class FeatureDistiller(nn.Module):
    """Intermediate-layer feature distillation weighted by a knowledge detector.

    ``forward(student_feats [B, L, Ds], teacher_feats [B, L, Dt], mask [B, L]) -> scalar``::

        a   = detector.weights(teacher_feats, mask)              # key knowledge, 0 at padding
        e_s = ln(student_proj(student_feats))                    # trainable Linear(Ds, K)
        e_t = ln(teacher_proj(teacher_feats))                    # frozen Linear(Dt, K)
        loss = sum_{b,i} a[b, i] * ||e_s[b, i] - e_t[b, i]||^2 / B

    with ``ln`` a layer norm without affine parameters (fused into
    :func:`spnn_fast.functional.feature_distillation_loss`). Embedding both sides into a shared
    ``d_knowledge`` space avoids forcing the student's size onto the teacher's.

    Why nothing here can cheat:

    * The detector's weights come from the teacher alone. It is trained with the teacher (through
      :meth:`KnowledgeDetector.pool` and an auxiliary next-item loss) and frozen here: the
      distiller sets ``requires_grad_(False)`` on it (on the module passed in, too) and evaluates it
      under ``no_grad`` on detached teacher features, so this loss cannot move the weights towards
      the positions where the student already matches.
    * The teacher projection is a fixed random semi-orthogonal matrix (``requires_grad`` False,
      evaluated under ``no_grad``). A trainable one could collapse ``e_t`` onto whatever the
      student produces; a fixed orthogonal map keeps the teacher's geometry (exactly when
      ``K >= Dt``, as a random projection that keeps distances approximately when ``K < Dt``) and
      the layer norm keeps every ``e_t`` at zero mean and unit variance, so the target never
      shrinks to a constant.
    * ``teacher_feats`` receive no gradient. Only ``student_proj`` and the student's features do.

    Args:
        d_student, d_teacher: feature sizes of the two intermediate layers.
        d_knowledge: size ``K`` of the shared space.
        detector: a trained :class:`KnowledgeDetector` over ``d_teacher`` features (a fresh one,
            i.e. a random scorer, if None).
        eps: layer-norm epsilon.
        backend: backend of :func:`spnn_fast.functional.feature_distillation_loss`.
    """

    def __init__(
        self,
        d_student: int,
        d_teacher: int,
        d_knowledge: int = 64,
        detector: Optional[KnowledgeDetector] = None,
        *,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_sizes("FeatureDistiller", d_student=d_student, d_teacher=d_teacher,
                     d_knowledge=d_knowledge)  # fmt: skip
        if detector is None:
            detector = KnowledgeDetector(d_teacher)
        if not isinstance(detector, KnowledgeDetector):
            raise TypeError(f"detector must be a KnowledgeDetector, got {type(detector).__name__}")
        if detector.d_teacher != d_teacher:
            raise ValueError(f"detector reads {detector.d_teacher} features, d_teacher={d_teacher}")
        self.d_student, self.d_teacher, self.d_knowledge = d_student, d_teacher, d_knowledge
        self.eps, self.backend = eps, backend
        self.detector = detector.requires_grad_(False)
        self.student_proj = nn.Linear(d_student, d_knowledge)
        self.teacher_proj = nn.Linear(d_teacher, d_knowledge, bias=False)
        nn.init.orthogonal_(self.teacher_proj.weight)
        self.teacher_proj.requires_grad_(False)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, mask: Tensor) -> Tensor:
        """The feature loss (a float32 scalar) of ``student_feats [B, L, d_student]`` against the
        frozen teacher's ``teacher_feats [B, L, d_teacher]``, over the positions where ``mask``
        (bool ``[B, L]``) is True, weighted by the knowledge detector."""
        from spnn_fast.functional import feature_distillation_loss

        _check_feats("student_feats", student_feats, self.d_student)
        _check_feats("teacher_feats", teacher_feats, self.d_teacher)
        if student_feats.shape[:2] != teacher_feats.shape[:2]:
            raise ValueError(
                f"student_feats {tuple(student_feats.shape)} and teacher_feats "
                f"{tuple(teacher_feats.shape)} must share [B, L]"
            )
        _check_feats("student_feats", student_feats, self.d_student, mask)
        b, seq_len = mask.shape
        with torch.no_grad():
            teacher_feats = teacher_feats.detach()
            weights = self.detector.weights(teacher_feats, mask) / b
            e_t = self.teacher_proj(teacher_feats)
        e_s = self.student_proj(student_feats)
        k = self.d_knowledge
        return feature_distillation_loss(
            e_s.reshape(b * seq_len, k), e_t.reshape(b * seq_len, k), weights.reshape(-1),
            eps=self.eps, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"d_student={self.d_student}, d_teacher={self.d_teacher}, d_knowledge={self.d_knowledge}"


# --------------------------------------------------------------------------------------------
# Sampled softmax: SampledSoftmaxLoss, SampledDistillationLoss
# --------------------------------------------------------------------------------------------


class SampledSoftmaxLoss(nn.Module):
    """Cross-entropy over each row's target and ``K`` shared negatives, logQ corrected:
    ``forward(input [..., D], weight [C, D], target [...], negatives [K], log_q [C] = None)`` is
    :func:`spnn_fast.functional.sampled_softmax_loss`. The negatives and ``log_q`` typically come
    from a :class:`spnn_fast.sampling.NegativeSampler` (``sample(K)``, ``log_q``)."""

    def __init__(self, remove_accidental_hits: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None) -> None:  # fmt: skip
        super().__init__()
        self.remove_accidental_hits, self.ignore_index = remove_accidental_hits, ignore_index
        self.reduction, self.backend = reduction, backend

    def _options(self) -> dict:
        return dict(remove_accidental_hits=self.remove_accidental_hits,
                    ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)  # fmt: skip

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, negatives: Tensor,
                log_q: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        from spnn_fast.functional import sampled_softmax_loss

        return sampled_softmax_loss(
            input, weight, target, negatives, log_q=log_q, **self._options()
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items() if k != "backend")


class SampledDistillationLoss(SampledSoftmaxLoss):
    """:class:`DistillationLoss` over sampled candidates (each row's target and the shared
    negatives): ``forward(student_hidden, student_items, teacher_hidden=None, teacher_items=None,
    target=None, negatives=None, log_q=None)`` is
    :func:`spnn_fast.functional.sampled_distillation_loss` (``alpha = 0``: no teacher needed)."""

    def __init__(self, temperature: float = 2.0, alpha: Optional[float] = None,
                 remove_accidental_hits: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None) -> None:  # fmt: skip
        super().__init__(remove_accidental_hits, ignore_index, reduction, backend)
        self.temperature, self.alpha = temperature, alpha

    def _options(self) -> dict:
        return dict(temperature=self.temperature, alpha=self.alpha, **super()._options())

    def forward(self, student_hidden: Tensor, student_items: Tensor,
                teacher_hidden: Optional[Tensor] = None, teacher_items: Optional[Tensor] = None,
                target: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                log_q: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        from spnn_fast.functional import sampled_distillation_loss

        return sampled_distillation_loss(student_hidden, student_items, teacher_hidden,
                                         teacher_items, target, negatives, log_q=log_q,
                                         **self._options())  # fmt: skip
