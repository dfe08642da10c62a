"""Files the package writes and reads back: atomic writes (a reader sees the old file or the
whole new one, never a partial one) and reads that name a damaged file instead of failing with a
raw traceback."""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable, Sequence, Union


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


class DamagedFileError(ValueError):
    """A file the package wrote earlier cannot be read back (the message names it, says what
    is wrong with it and how to recover)."""


def load_checkpoint_file(
    path: Union[str, os.PathLike], device, keys: Sequence[str], recover: str = ""
) -> dict:
    """The dict saved by ``torch.save`` at ``path`` (tensors on ``device``), checked to hold
    ``keys``; :class:`DamagedFileError` for a file that is empty, truncated, not a checkpoint or
    lacks a key, naming the file and, with ``recover``, how to recover."""
    import torch

    hint = f"; {recover}" if recover else ""
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {why}){hint}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} does not hold an spnn_fast checkpoint{hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(f"{path} lacks {', '.join(missing)}: it is damaged or not an "
                               f"spnn_fast checkpoint{hint}")  # fmt: skip
    return obj


def read_json(path: Union[str, os.PathLike], keys: Sequence[str] = (), recover: str = "") -> dict:
    """The JSON object at ``path``, checked to hold ``keys``; :class:`DamagedFileError` for a
    file that is not such an object, naming the file and, with ``recover``, how to recover."""
    hint = f"; {recover}" if recover else ""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} does not hold a JSON object{hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(f"{path} lacks {', '.join(missing)}{hint}")
    return obj


def write_json(obj, path: Union[str, os.PathLike]) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), text=True)
