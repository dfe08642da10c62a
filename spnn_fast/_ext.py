"""Loads the compiled extension ``spnn_fast._C`` (the C++ batch encoder), if it was built.

``C`` is the module, or None when it did not load; ``ERROR`` then says why. Importing this never
fails: an install without a C++ toolchain runs the numpy fallback (see :mod:`spnn_fast.backends`).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["C", "ERROR"]

try:
    from spnn_fast import _C as C

    ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the install
    C = None
    ERROR = str(e)
