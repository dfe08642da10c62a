"""Fixed CPU threading, so that a run's floating-point sums do not depend on the machine's load.

torch's own parallel loops split their work by the number of intra-op threads, which is fixed
for a process. The MKL that torch's CPU build carries, however, chooses by default how many
threads each call uses ("dynamic" threading), and on a busy machine it may choose fewer: a
matrix product then adds its terms in another order and training drifts by the last bits.
Intel's conditions for reproducible results are a fixed thread count with dynamic threading off
(``MKL_DYNAMIC=FALSE``); :func:`fix_threads` sets both for this process.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

__all__ = ["fix_threads", "mkl_dynamic"]


def _torch_mkl() -> Optional[ctypes.CDLL]:
    """torch's CPU library when it exports MKL's threading controls, else None (another BLAS,
    another platform)."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    ok = hasattr(lib, "MKL_Set_Dynamic") and hasattr(lib, "mkl_serv_get_dynamic")
    return lib if ok else None


def mkl_dynamic() -> Optional[bool]:
    """Whether MKL chooses the thread count per call (None where torch carries no MKL)."""
    lib = _torch_mkl()
    return None if lib is None else bool(lib.mkl_serv_get_dynamic())


def fix_threads(threads: Optional[int] = None) -> int:
    """Use ``threads`` intra-op threads (default: torch's current count) in every op, MKL's
    included; returns the count."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    lib = _torch_mkl()
    if lib is not None:
        lib.MKL_Set_Dynamic(0)
    return torch.get_num_threads()
