"""The C++ helpers of the attention's time bias on the CPU (``spnn_fast._C``, see
``csrc/time_bias.cpp``): the bias as an additive mask (or added to scores) and its gradient's
histogram, each gap's bucket computed once per query-key pair for every head. The torch
definitions they replace live in :mod:`spnn_fast.reference.attention`, which falls back to them
where the extension did not load."""

from __future__ import annotations

from typing import Optional

import torch

from spnn_fast import _ext

__all__ = ["add_bias_grad", "available", "bias_into", "loaded", "num_threads"]


# Output elements per helper thread: below this a call runs on the caller's thread alone (a
# thread's start, and the cores that torch's OpenMP threads still spin on after the op before,
# cost more than a small call's work).
_PER_THREAD = 1 << 20


def num_threads(work: int = 1 << 62) -> int:
    """The threads a helper call of ``work`` output elements runs on: torch's intra-op count, at
    most one per :data:`_PER_THREAD` elements."""
    return max(1, min(torch.get_num_threads(), work // _PER_THREAD))


def loaded() -> bool:
    """Whether the extension (and so the helpers) loaded."""
    return _ext.C is not None


def available(t: torch.Tensor, timestamps: Optional[torch.Tensor]) -> bool:
    """Whether the helpers serve a float32 CPU tensor ``t`` (the extension loaded)."""
    return (
        loaded()
        and timestamps is not None
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
    )


def bias_into(out, key_mask, timestamps, time_bias, causal, r0, accumulate):
    """``out [B, H, R, K]`` (float32, CPU, contiguous) set to (or increased by) the time bias
    of query rows ``r0 ..``, -inf where a key is not admissible: the C++ helper."""
    km = None if key_mask is None else key_mask.contiguous().numpy()
    _ext.C.time_bias_mask(timestamps.to(torch.int64).contiguous().numpy(), km,
                          time_bias.detach().to(torch.float32).contiguous().numpy(), causal, r0,
                          out.numpy(), accumulate, num_threads(out.numel()))  # fmt: skip


def add_bias_grad(dbias, ds, timestamps, r0) -> None:
    """``dbias[h, n] +=`` the sum of ``ds [B, H, R, K]`` (float32 or float64, CPU) over the
    pairs of query rows ``r0 ..`` and keys in bucket ``n``: float64 sums in a fixed order."""
    hist = _ext.C.time_bias_grad(timestamps.to(torch.int64).contiguous().numpy(),
                                 ds.contiguous().numpy(), r0, dbias.shape[1],
                                 num_threads(ds.numel()))  # fmt: skip
    dbias += torch.from_numpy(hist).to(dbias.dtype)
