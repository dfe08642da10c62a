"""Intermediate-layer distillation: KnowledgeDetector, FeatureDistiller."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from spnn_fast.nn.attention import check_sizes

__all__ = ["FeatureDistiller", "KnowledgeDetector"]


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
        check_sizes("KnowledgeDetector", d_teacher=d_teacher, d_hidden=d_hidden)
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
        check_sizes("FeatureDistiller", d_student=d_student, d_teacher=d_teacher,
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
