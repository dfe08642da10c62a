"""What the Triton kernels accept, in one Triton-free module.

The kernels (``spnn_fast.kernels``) and the functional API's validation both read these, so a
call can be checked, and routed to the PyTorch path, without importing Triton.
"""

from __future__ import annotations

import torch

__all__ = [
    "ATTN_DTYPES",
    "ATTN_HEAD_DIMS",
    "ATTN_TIMESTAMP_DTYPES",
    "DISTILL_MAX_DIM",
    "FEATURE_MAX_K",
    "MAX_TIME_BUCKETS",
    "SAMPLED_MAX_DIM",
    "TOPK_MAX_DIM",
    "TOPK_MAX_K",
]

# Semantic attention: head dims the kernels are compiled for (another D <= 128 is zero-padded to
# the next one), the dtypes of q/k/v, and the largest time-bias table (buckets per head).
ATTN_HEAD_DIMS = (16, 32, 64, 128)
ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TIME_BUCKETS = 64
# Integer dtypes accepted for timestamps (any path); they are widened to int64.
ATTN_TIMESTAMP_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Distillation loss: the largest hidden size (student or teacher) the kernels hold in registers.
DISTILL_MAX_DIM = 256

# Sampled softmax losses: the largest hidden size (student or teacher) the kernels hold in
# registers (the distillation kernels' tiles, whose configurations they share).
SAMPLED_MAX_DIM = DISTILL_MAX_DIM

# Feature distillation loss: the largest embedding size K (a whole row lives in registers).
FEATURE_MAX_K = 8192

# Top-k and target rank over the catalogue: the largest k whose running top-k the kernel holds in
# registers (a larger k runs on the PyTorch path), and the largest hidden size D.
TOPK_MAX_K = 128
TOPK_MAX_DIM = 256
