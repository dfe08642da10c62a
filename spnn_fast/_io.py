"""Files the package writes and reads back: atomic writes (a reader sees the old file or the
whole new one, never a partial one) and reads that name a damaged file instead of failing with a
raw traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from typing import IO, Callable, Optional, Sequence, Union


def atomic_write(
    path: Union[str, os.PathLike], write: Callable[[IO], object], *, text: bool = False
) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failure (or an interrupt) removes the temporary file and leaves ``path`` as it was; an
    OSError (a full disk, a folder without write permission) is raised naming ``path``. The
    data reach the disk (fsync) before the rename, so a crash leaves the old file or the new one.
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"cannot write {os.fspath(path)}: {e.strerror}") from None
        if isinstance(e, RuntimeError) and ("inline_container" in str(e)
                                            or "PytorchStreamWriter" in str(e)):  # fmt: skip
            # torch.save's writer reports a failed write (a full disk) as a RuntimeError
            full = shutil.disk_usage(folder or ".").free < 2**20
            why = "the disk is full" if full else str(e).splitlines()[0][:200]
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, f"cannot write {os.fspath(path)}: {why}") from None
        raise


class DamagedFileError(ValueError):
    """A file the package wrote earlier cannot be read back (the message names it, says what
    is wrong with it and how to recover)."""


def _empty(path) -> str:
    try:
        return "it is empty" if os.path.getsize(path) == 0 else ""
    except OSError:
        return ""


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
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # not a damaged file: one that cannot be opened
    except Exception as e:  # torch raises many types for a damaged file
        why = _empty(path) or f"it is truncated or not a checkpoint ({type(e).__name__})"
        raise DamagedFileError(f"{path} is damaged: {why}{hint}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} does not hold an spnn_fast checkpoint{hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(f"{path} lacks {', '.join(missing)}: it is damaged or not an "
                               f"spnn_fast checkpoint{hint}")  # fmt: skip
    return obj


def not_finite(state: dict, what: str = "parameter") -> Optional[str]:
    """None when every floating tensor in the dict ``state`` is finite, else which one is not: a
    model that diverged, or a damaged file, would otherwise fail far from its cause."""
    import torch

    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(v.isfinite().all()):
            return f"its {what} {k} holds NaN or infinite values"
    return None


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words (``a string``, ``the number 3``, ``null``, ...)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    kinds = {str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


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
        why = _empty(path) or f"it is not valid JSON ({e})"
        raise DamagedFileError(f"{path} is damaged: {why}{hint}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} does not hold a JSON object{hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(f"{path} lacks {', '.join(missing)}{hint}")
    return obj


def write_json(obj, path: Union[str, os.PathLike]) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), text=True)


def check_path_arg(flag: str, value: object, what: str) -> None:
    """ValueError unless ``value`` names a path (a string that is not blank): an empty one would
    fall back to a default place, or name the working directory."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{flag} must name {what}, got {value!r}")


def same_file(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """True when the paths ``a`` and ``b`` name one file: the same path once relative parts and
    symlinks are resolved, or, where both exist, the same file on disk (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
