"""The time-gap bucket shared by the encoder, the attention bias and the model.

``bucket(g) = min(num_buckets - 1, bit_length(g))`` for a gap ``g >= 0`` (``bit_length(0) = 0``,
``bit_length(1) = 1``, ``bit_length(2 or 3) = 2``, ...). Gaps are int64 seconds.

One algorithm, written for torch and for numpy: the exponent field of ``float64(g)`` minus 1022
is ``bit_length(g)``, exactly for ``g < 2**53``. Above, the conversion may round ``g`` up to the
next power of two and add one, which the integer test ``g >> (e - 1) == 0`` undoes; that matters
only when ``num_buckets > 54`` (else both land in the top bucket). Exact for every int64 gap
``>= 0`` up to ``2**63 - 1`` (the tests check every power of two and its neighbours against
``int.bit_length``), in a few elementwise passes instead of one comparison per bucket.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["bit_length_np", "time_bucket", "time_bucket_np"]

# Largest num_buckets for which the float64 exponent alone gives the right bucket: a rounded-up
# exponent only occurs at bit_length >= 54, and min(num_buckets - 1, .) then hides it.
_EXACT_FROM_EXPONENT = 54


def bit_length_np(gaps: np.ndarray) -> np.ndarray:
    """Exact ``int.bit_length`` of non-negative int64 values, vectorized (int64 result)."""
    g = np.asarray(gaps, dtype=np.int64)
    e = (g.astype(np.float64).view(np.int64) >> 52) - 1022  # g == 0 gives -1022
    e -= np.right_shift(g, np.clip(e - 1, 0, 63)) == 0  # rounded up to 2**e; also g == 0
    return np.maximum(e, 0)


def time_bucket_np(gaps: np.ndarray, num_buckets: int) -> np.ndarray:
    """``min(num_buckets - 1, bit_length(gaps))`` for non-negative int64 gaps (numpy, int64)."""
    return np.minimum(bit_length_np(gaps), num_buckets - 1)


def time_bucket(gaps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``min(num_buckets - 1, bit_length(gaps))`` for non-negative integer gaps (torch, int64)."""
    g = gaps.to(torch.int64)
    e = (g.to(torch.float64).view(torch.int64) >> 52).sub_(1022)  # g == 0 gives -1022
    if num_buckets > _EXACT_FROM_EXPONENT:
        e -= (torch.bitwise_right_shift(g, (e - 1).clamp_(0, 63)) == 0).to(torch.int64)
    return e.clamp_(0, num_buckets - 1)
