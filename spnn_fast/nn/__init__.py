"""Modules of spnn_fast: each ``forward`` is one call into :mod:`spnn_fast.functional`."""

from spnn_fast.nn.attention import FastDropout, SemanticAttention
from spnn_fast.nn.distill import FeatureDistiller, KnowledgeDetector
from spnn_fast.nn.losses import (
    DistillationLoss,
    LinearCrossEntropyLoss,
    SampledDistillationLoss,
    SampledSoftmaxLoss,
)

__all__ = [
    "DistillationLoss",
    "FastDropout",
    "FeatureDistiller",
    "KnowledgeDetector",
    "LinearCrossEntropyLoss",
    "SampledDistillationLoss",
    "SampledSoftmaxLoss",
    "SemanticAttention",
]
