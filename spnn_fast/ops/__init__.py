"""torch.library registrations of the fused ops (custom_op + register_fake + autograd).

Importing the package registers every op here, before any is called: a program exported with
``torch.export`` or packaged by AOTInductor names ``torch.ops.spnn_fast.*``, and a process that
loads it finds them after ``import spnn_fast``. None of these modules imports Triton (the
kernels load on the first Triton call).
"""

from spnn_fast.ops import (
    attention,
    distill,
    distill_ensemble,
    feature_distill,
    sampled_softmax,
    topk,
)

__all__ = [
    "attention",
    "distill",
    "distill_ensemble",
    "feature_distill",
    "sampled_softmax",
    "topk",
]
