"""The one place that decides which implementation of an op runs.

Backends:
  * ``"cpp"``    the compiled extension ``spnn_fast._C`` (CPU, numpy buffers; the batch encoder)
  * ``"triton"`` the fused Triton kernels in ``spnn_fast.kernels`` (CUDA tensors, or CPU tensors
                 when ``TRITON_INTERPRET=1`` is set, which runs the same kernels in the interpreter)
  * ``"torch"``  the pure-PyTorch / numpy definitions in ``spnn_fast.reference`` (any device)
  * ``"auto"``   the fastest of the above that can run the call

Every op takes ``backend=None | "auto" | "cpp" | "triton" | "torch"`` (the ones that apply to it).
``None`` reads the environment variable ``SPNN_FAST_BACKEND`` and falls back to ``"auto"``. An
explicit request for a backend that cannot run raises :class:`BackendUnavailableError` with the
reason; nothing silently falls back.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional, Sequence

import torch

from spnn_fast import _ext

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "SpnnFastWarning",
    "select",
    "status",
]

BACKENDS = ("auto", "cpp", "triton", "torch")
ENV_VAR = "SPNN_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


class SpnnFastWarning(UserWarning):
    """Warnings about optional pieces that were skipped (filter with this category)."""


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def status() -> dict:
    """What can run here, as a dict of bools.

    ``cpp``: the C++ extension loaded. ``triton``: Triton kernels can run here (Triton installed and
    a CUDA device, or the interpreter). ``cuda``: a CUDA device is visible. ``interpret``:
    ``TRITON_INTERPRET=1`` is set. ``triton_installed``: the ``triton`` package can be imported.
    """
    cuda = _cuda_available()
    interp = interpret_mode()
    return {
        "cpp": _ext.C is not None,
        "triton": _TRITON_INSTALLED and (cuda or interp),
        "cuda": cuda,
        "interpret": interp,
        "triton_installed": _TRITON_INSTALLED,
    }


def _warn_missing_once() -> None:
    skipped = []
    if _ext.C is None:
        skipped.append(
            "the C++ extension spnn_fast._C did not load "
            f"({_ext.ERROR}); encode_batch uses the numpy fallback. Reinstall with a C++17 "
            "compiler present: pip install --force-reinstall --no-deps ."
        )
    if not _TRITON_INSTALLED and _cuda_available():
        skipped.append(
            "Triton is not installed; attention and losses use the PyTorch fallback on the GPU. "
            "Install it with: pip install 'spnn_fast[triton]'"
        )
    if skipped:
        warnings.warn("spnn_fast: " + " | ".join(skipped), SpnnFastWarning, stacklevel=3)


def _normalize(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; valid: {', '.join(BACKENDS)}")
    return name.lower()


def _triton_reason(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on ``device``, else why not."""
    if not _TRITON_INSTALLED:
        return "Triton is not installed (pip install 'spnn_fast[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpret_mode():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"Triton kernels do not run on device type {device.type!r}"


def _cpp_reason(device: torch.device) -> Optional[str]:
    if _ext.C is None:
        return f"the C++ extension spnn_fast._C did not load ({_ext.ERROR})"
    if device.type != "cpu":
        return f"the C++ backend runs on CPU data, got device {device}"
    return None


_REASONS = {"triton": _triton_reason, "cpp": _cpp_reason, "torch": lambda device: None}


def select(
    op: str,
    backend: Optional[str],
    supported: Sequence[str],
    device: torch.device | str = "cpu",
) -> str:
    """Pick the implementation of ``op`` for a call.

    ``supported`` lists the concrete backends the op has, fastest first; ``"torch"`` must be among
    them. Returns one of them. Raises ``ValueError`` for a name that is not a backend or not one
    of this op's, :class:`BackendUnavailableError` when an explicit backend cannot run here.
    """
    device = torch.device(device)
    if backend is None:
        env = os.environ.get(ENV_VAR)
        # The variable is a process-wide preference: ops that lack the named backend use "auto".
        backend = _normalize(env, ENV_VAR) if env else "auto"
        if backend != "auto" and backend not in supported:
            backend = "auto"
    else:
        backend = _normalize(backend, "backend")
        if backend != "auto" and backend not in supported:
            raise ValueError(
                f"backend={backend!r} does not apply to {op}; valid: auto, {', '.join(supported)}"
            )
    if backend == "auto":
        for name in supported:
            # Under the interpreter Triton is far slower than torch on the CPU: auto never picks it.
            if name == "triton" and device.type != "cuda":
                continue
            if _REASONS[name](device) is None:
                return name
        return "torch"
    reason = _REASONS[backend](device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run here: {reason}")
    return backend
