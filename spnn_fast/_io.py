"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Callable, Union


def atomic_write(
    path: Union[str, os.PathLike], write: Callable[[IO], object], *, text: bool = False
) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failure (or an interrupt) removes the temporary file and leaves ``path`` as it was.
    """
    folder, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
