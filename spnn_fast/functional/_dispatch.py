"""Triton-or-torch dispatch shared by the functional ops."""

from __future__ import annotations

from typing import Optional

import torch

from spnn_fast import backends

__all__ = ["triton_or_torch"]


def triton_or_torch(op: str, backend: Optional[str], device: torch.device, why_not) -> str:
    """:func:`backends.select` among ("triton", "torch"); when it picks Triton and ``why_not()``
    names something the kernels cannot run, an explicit ``backend="triton"`` (any case) raises
    ValueError with that reason and every other request falls back to "torch"."""
    name = backends.select(op, backend, supported=("triton", "torch"), device=device)
    why = why_not() if name == "triton" else None
    if why is None:
        return name
    if isinstance(backend, str) and backend.lower() == "triton":
        raise ValueError(f"{op}: backend='triton' cannot run this call: {why}")
    return "torch"
