"""Triton-or-torch dispatch shared by the functional ops."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from spnn_fast import backends

__all__ = ["check_values", "triton_or_torch"]


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


def check_values(ok: torch.Tensor, message: Callable[[], str], short: str) -> None:
    """A check of tensor values (``ok``: a bool tensor, True when they are good). Eagerly a
    ValueError with ``message()`` (reading ``ok`` waits for the device: the check, not the op,
    holds that one sync); under torch.compile an asynchronous device-side assert with ``short``,
    which traces without a graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, short)
    elif not bool(ok):
        raise ValueError(message())
