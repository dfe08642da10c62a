"""What a run was trained on: the data's files, fingerprinted (size and sha256 of the data file
and its side files), so that a run folder or a checkpoint can refuse to go on with, or be
evaluated on, data that have changed since. A path is recorded absolute, so that a command run
from another directory reads the same file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

from spnn_fast._checks import is_int
from spnn_fast._formats import resolve, source_files
from spnn_fast._io import file_sha256
from spnn_fast.download import cache_dir, is_dataset_name

__all__ = [
    "absolute_dataset",
    "check_same_data",
    "data_files",
    "data_fingerprint",
    "is_fingerprint",
]


def absolute_dataset(dataset: str) -> str:
    """``dataset`` as a run folder records it: a known name as it is, a path made absolute (so
    that ``--resume`` and ``eval`` from another directory read the same file)."""
    return dataset if is_dataset_name(dataset) else os.path.abspath(os.path.expanduser(dataset))


def data_files(dataset: str) -> List[Path]:
    """The files ``load(dataset)`` reads: the data file and its side files."""
    if is_dataset_name(dataset):
        return source_files(cache_dir() / dataset / f"{dataset}.inter", "atomic")
    return source_files(*resolve(Path(dataset).expanduser(), None))


def data_fingerprint(dataset: str) -> Dict:
    """What ``load(dataset)`` reads: ``{"source": absolute path or name, "files": {name:
    {"bytes": size, "sha256": hex digest}}}`` over the data file and its side files."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in data_files(dataset)}  # fmt: skip
    return {"source": absolute_dataset(dataset), "files": files}


def _describe_data(fp: Dict) -> str:
    return ", ".join(f"{name} ({f['bytes']:,} bytes, sha256 {f['sha256'][:16]})"
                     for name, f in sorted(fp["files"].items())) or "no files"  # fmt: skip


def check_same_data(recorded: Optional[Dict], current: Dict, what: str, *,
                    allow_changed: bool = False, log: Callable[[str], None] = print) -> None:  # fmt: skip
    """ValueError unless ``current`` (a :func:`data_fingerprint`) is the data ``recorded`` for
    ``what`` (a run folder, a checkpoint); with ``allow_changed`` a warning instead."""
    if recorded is None:
        log(f"warning: {what} records no fingerprint of its data (an older spnn_fast wrote it): "
            f"the data are not checked")  # fmt: skip
        return
    if recorded["files"] == current["files"]:
        return
    differ = (f"{current['source']} is not the data {what} was trained on: it now holds "
              f"{_describe_data(current)}; {what} recorded {_describe_data(recorded)}")  # fmt: skip
    if allow_changed:
        log(f"warning: {differ}; going on (--allow-changed-data)")
        return
    raise ValueError(f"{differ}. Restore those data, or train into another --out, or pass "
                     f"--allow-changed-data to go on with these")  # fmt: skip


def is_fingerprint(data: object) -> bool:
    """True when ``data`` has the form of a :func:`data_fingerprint`."""
    files = data.get("files") if isinstance(data, dict) else None
    return isinstance(files, dict) and all(
        isinstance(f, dict) and is_int(f.get("bytes"), 0) and isinstance(f.get("sha256"), str)
        for f in files.values()
    )
