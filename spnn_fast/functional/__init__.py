"""Functional API of spnn_fast: one function per op (validation, then dispatch to a backend)."""

from spnn_fast.functional.attention import semantic_attention
from spnn_fast.functional.losses import (
    distillation_loss,
    feature_distillation_loss,
    linear_cross_entropy,
)
from spnn_fast.functional.sampled import sampled_distillation_loss, sampled_softmax_loss
from spnn_fast.functional.topk import TopK, target_rank, topk_scores

__all__ = [
    "TopK",
    "distillation_loss",
    "feature_distillation_loss",
    "linear_cross_entropy",
    "sampled_distillation_loss",
    "sampled_softmax_loss",
    "semantic_attention",
    "target_rank",
    "topk_scores",
]
