"""Argument checks shared by every module: one place for the rules and their messages.

Two kinds: predicates (``is_int``, ``is_real``) for configs that report every bad field in their
own words, and ``check_*`` functions that raise at once, naming the argument: TypeError for a
value of the wrong kind, ValueError for a value of the right kind that is out of range.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "check_choice",
    "check_device",
    "check_int",
    "check_matrix",
    "check_real",
    "check_same",
    "describe",
    "is_int",
    "is_real",
    "plain_number",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(value: object, low: Optional[int] = None) -> bool:
    """An integer (Python or numpy, never a bool) and, with ``low``, at least ``low``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return ok and (low is None or value >= low)


def is_real(
    value: object, low: float = -math.inf, high: float = math.inf, *, open_low: bool = False
) -> bool:
    """A finite real number (never a bool) in ``[low, high]`` (``(low, high]`` with open_low)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return (value > low if open_low else value >= low) and value <= high


def plain_number(value: object) -> object:
    """``value`` as Python's int or float when it is a number of another type (numpy's, a
    Fraction), else as it is: a config saved in JSON or in a checkpoint that
    ``torch.load(weights_only=True)`` reads back holds plain numbers only."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_int(name: str, value: object, minimum: int, why: str = "") -> int:
    """``int(value)``; TypeError unless an integer, ValueError below ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}")
    return int(value)


def check_real(
    name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
    open_low: bool = False,
) -> float:  # fmt: skip
    """``float(value)``; TypeError unless a real number, ValueError unless finite and in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not is_real(value, low, high, open_low=open_low):
        lo = f"> {low}" if open_low else f">= {low}"
        rule = f"finite and {lo}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    """``value`` when it is one of ``choices`` (compared with ``==``, bools apart), else a
    ValueError that lists them."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def describe(t: Tensor) -> str:
    """``shape (...), dtype, device``: how error messages show a tensor."""
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_matrix(name: str, t: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tensor:
    """``t`` when it is a 2-D tensor of one of ``dtypes``, else a ValueError naming it."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {describe(t)}")
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {describe(t)}")
    return t


def check_same(name_a: str, a: Tensor, name_b: str, b: Tensor, dtype: bool = True) -> None:
    """ValueError unless ``a`` and ``b`` share a device (and, with ``dtype``, a dtype)."""
    if a.device != b.device:
        raise ValueError(
            f"{name_a} ({describe(a)}) and {name_b} ({describe(b)}) are on different devices"
        )
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_a} ({describe(a)}) and {name_b} ({describe(b)}) differ in dtype")


def check_device(device: object) -> str:
    """``device`` when this machine can compute on it ("cpu", "cuda" or "cuda:N"), else a
    ValueError (TypeError for a non-string) saying why."""
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a str such as 'cpu' or 'cuda', got {type(device).__name__}"
        )
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if d.type == "cpu" and d.index not in (None, 0):
        raise ValueError(f"device={device!r}: the CPU is one device, use 'cpu'")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: spnn_fast runs on 'cpu' or 'cuda'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but no CUDA device is visible")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device
