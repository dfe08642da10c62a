"""Weighted squared distance between layer-normed embeddings, in plain PyTorch.

``student_emb s [N, K]``, ``teacher_emb t [N, K]``, ``weights w [N]``::

    loss = sum_i w_i * ||ln(s_i) - ln(t_i)||^2,   ln = layer norm over K without affine

Only ``student_emb`` receives a gradient (the teacher side and the weights are detached). The
``backend="torch"`` path of :func:`spnn_fast.functional.feature_distillation_loss`, the test
oracle and the benchmark baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feature_distillation_rows_reference", "feature_distillation_loss_reference"]


def feature_distillation_rows_reference(
    student_emb: Tensor, teacher_emb: Tensor, weights: Tensor, eps: float = 1e-5
) -> Tensor:
    """Per-row losses ``[N]`` in fp32 (fp64 for fp64 inputs)."""
    cdt = torch.float64 if student_emb.dtype == torch.float64 else torch.float32
    k = student_emb.shape[-1]
    a = F.layer_norm(student_emb.to(cdt), (k,), eps=eps)
    b = F.layer_norm(teacher_emb.detach().to(cdt), (k,), eps=eps)
    return weights.detach().to(cdt) * (a - b).pow(2).sum(-1)


def feature_distillation_loss_reference(
    student_emb: Tensor, teacher_emb: Tensor, weights: Tensor, eps: float = 1e-5
) -> Tensor:
    """The scalar loss (sum of :func:`feature_distillation_rows_reference`)."""
    return feature_distillation_rows_reference(student_emb, teacher_emb, weights, eps).sum()
