"""The time-gap bucket shared by the encoder, the attention bias and the model.

``bucket(g) = min(num_buckets - 1, bit_length(g))`` for a gap ``g >= 0`` (``bit_length(0) = 0``,
``bit_length(1) = 1``, ``bit_length(2 or 3) = 2``, ...). Gaps are int64 seconds.
"""

from __future__ import annotations

import numpy as np
import torch


def bit_length_np(gaps: np.ndarray) -> np.ndarray:
    """Exact ``int.bit_length`` of non-negative int64 values, vectorized (int64 result)."""
    g = np.asarray(gaps, dtype=np.int64)
    # frexp is exact up to 2**53; above, rounding can add one to the exponent, undone below.
    _, exp = np.frexp(g.astype(np.float64))
    exp = exp.astype(np.int64)
    big = exp > 53
    if big.any():
        lo = np.left_shift(np.uint64(1), (exp[big] - 1).astype(np.uint64))
        exp[big] -= (g[big].astype(np.uint64) < lo).astype(np.int64)
    return exp


def time_bucket_np(gaps: np.ndarray, num_buckets: int) -> np.ndarray:
    """``min(num_buckets - 1, bit_length(gaps))`` for non-negative int64 gaps (numpy)."""
    return np.minimum(bit_length_np(gaps), num_buckets - 1)


def time_bucket(gaps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``min(num_buckets - 1, bit_length(gaps))`` for non-negative integer gaps (torch, int64).

    Counts the thresholds ``2**k <= g`` for ``k < num_buckets - 1``; exact for every int64 gap
    (no float rounding) and cheap for the bucket counts used in practice (<= 64).
    """
    g = gaps.to(torch.int64)
    out = torch.zeros_like(g)
    for k in range(min(num_buckets - 1, 63)):
        out += (g >= (1 << k)).to(torch.int64)
    return out
