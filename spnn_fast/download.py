"""Named data sets, downloaded once into a cache folder.

``ml-100k`` (MovieLens-100K) comes as RecBole atomic files, which ship inside the
``recbole==1.2.1`` wheel: :func:`fetch` downloads the wheel once with this Python's ``pip
download --no-deps`` into ``$SPNN_FAST_CACHE`` (else ``$XDG_CACHE_HOME/spnn_fast``, else
``~/.cache/spnn_fast``) and extracts the three files; later calls read the cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List

from spnn_fast._io import atomic_write

__all__ = [
    "KNOWN_DATASETS",
    "DatasetUnavailableError",
    "cache_dir",
    "check_counts",
    "fetch",
    "is_dataset_name",
]

logger = logging.getLogger("spnn_fast")

_RECBOLE = "recbole==1.2.1"
_ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
# (events, users, items) of the raw files; checked after parsing.
_ML100K_COUNTS = (100000, 943, 1682)

KNOWN_DATASETS: Dict[str, str] = {
    "ml-100k": "MovieLens-100K (RecBole atomic files from the recbole==1.2.1 wheel on PyPI)",
}


class DatasetUnavailableError(RuntimeError):
    """A named data set is neither cached nor downloadable (the message says how to provide it)."""


def is_dataset_name(text: str) -> bool:
    """Whether ``load(text)`` reads a named data set: a known name without a path separator (a
    name with one, such as ``./ml-100k``, is a path)."""
    return text in KNOWN_DATASETS and os.sep not in text and "/" not in text


def cache_dir() -> Path:
    """``$SPNN_FAST_CACHE``, else ``$XDG_CACHE_HOME/spnn_fast``, else ``~/.cache/spnn_fast``."""
    env = os.environ.get("SPNN_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "spnn_fast"


def _pip_download_command(dest: str) -> List[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "1",
        "--timeout",
        "30",
        _RECBOLE,
        "-d",
        dest,
    ]


def _manual_help(folder: Path) -> str:
    files = ", ".join(_ML100K_FILES)
    return (
        f"To provide the files by hand, place {files} (RecBole atomic files, found in the "
        f"{_RECBOLE} wheel under {_ML100K_MEMBER}) into the folder {folder} "
        f"(set SPNN_FAST_CACHE to use another cache folder), or pass their folder or the .inter "
        f"file: spnn_fast.data.load('/path/to/ml-100k'). On a machine with network access, "
        f"'pip download --no-deps --only-binary=:all: {_RECBOLE}' fetches the wheel, a zip file."
    )


def fetch(name: str = "ml-100k", *, download: bool = True) -> Path:
    """Make sure the files of a named data set are in the cache; return their folder.

    Downloads the ``recbole==1.2.1`` wheel (once, without dependencies) with this Python's pip
    and extracts the three atomic files atomically. ``download=False`` only checks the cache.
    Raises :class:`DatasetUnavailableError` with instructions when the files cannot be had.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; known: {sorted(KNOWN_DATASETS)}")
    folder = cache_dir() / name
    if all((folder / f).is_file() for f in _ML100K_FILES):
        return folder
    if not download:
        raise DatasetUnavailableError(
            f"{name} is not in the cache folder {folder} and download=False. {_manual_help(folder)}"
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spnn_fast_") as tmp:
        cmd = _pip_download_command(tmp)
        shown = " ".join(cmd)
        logger.info("downloading %s: %s", name, shown)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DatasetUnavailableError(
                f"could not fetch {name}: the command `{shown}` failed ({e}). {_manual_help(folder)}"
            ) from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
            raise DatasetUnavailableError(
                f"could not fetch {name}: the command `{shown}` exited with status "
                f"{proc.returncode}:\n{tail}\n{_manual_help(folder)}"
            )
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise DatasetUnavailableError(
                f"could not fetch {name}: `{shown}` left no recbole wheel in {tmp}. "
                f"{_manual_help(folder)}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                payload = {f: wheel.read(_ML100K_MEMBER + f) for f in _ML100K_FILES}
        except (KeyError, zipfile.BadZipFile) as e:
            raise DatasetUnavailableError(
                f"could not fetch {name}: {wheels[0].name} does not hold the expected files "
                f"({e}). {_manual_help(folder)}"
            ) from e
    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in payload.items():
        atomic_write(folder / fname, lambda f, data=data: f.write(data))
    logger.info("fetched %s into %s in %.1f s", name, folder, time.perf_counter() - start)
    return folder


def check_counts(folder: Path, got) -> None:
    """ValueError unless ``got`` = (events, users, items) parsed from the ml-100k files in
    ``folder`` are those of the real files."""
    got = tuple(int(x) for x in got)
    if got != _ML100K_COUNTS:
        raise ValueError(
            f"{folder}: the ml-100k files hold (events, users, items) = {got}, expected "
            f"{_ML100K_COUNTS}; delete the folder to fetch the files again"
        )
