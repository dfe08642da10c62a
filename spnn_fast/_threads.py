"""Fixed CPU threading, so that a run's floating-point sums do not depend on the machine's load.

torch's own parallel loops split their work by the number of intra-op threads, which is fixed
for a process. The MKL that torch's CPU build carries, however, chooses by default how many
threads each call uses ("dynamic" threading), and on a busy machine it may choose fewer: a
matrix product then adds its terms in another order and training drifts by the last bits.
Intel's conditions for reproducible results are a fixed thread count with dynamic threading off
(``MKL_DYNAMIC=FALSE``); :func:`fix_threads` sets both for this process.

:func:`retain_freed_memory` is the commands' other process setting: glibc returns a large freed
block to the kernel at once (it was mmapped) and the next step's block of the same size comes
back as fresh pages, each one a page fault on first touch. A training step allocates and frees
the same tens of MiB of temporaries every time; kept in the heap, they are reused without
faults (on ml-100k about 1/8 of a step on the CPU).
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

__all__ = ["fix_threads", "mkl_dynamic", "retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks above it are still mmapped
_TRIM_THRESHOLD = 2**30


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


def retain_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to 1 GiB of freed heap memory for
    reuse (glibc's ``mallopt``); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        trim = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
        return mmap and trim  # either one alone already helps
    except (OSError, AttributeError):
        return False


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
