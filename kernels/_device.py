"""What the launchers ask of the device, in one place (kernel_stats replaces it with an sm_90's)."""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["multiprocessor_count"]


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device; None for any other device (the interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
