"""The file formats :func:`spnn_fast.data.load` reads: each gives the raw (user, item, time)
columns and, where the format has them, the item and user side files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from spnn_fast._tables import Table, parse_ids, parse_timestamps, read_table

__all__ = ["Raw", "Side", "read_atomic", "read_csv", "read_ml1m", "resolve", "source_files"]

_FORMATS = ("atomic", "ml-1m", "csv")
_COLUMN_NAMES = {
    "user": ("user", "user_id"),
    "item": ("item", "item_id"),
    "timestamp": ("timestamp", "time"),
}
# The keyword of load() that names each column.
_COLUMN_KEYWORDS = {"user": "user_col", "item": "item_col", "timestamp": "time_col"}


@dataclass
class Side:
    """A side file (items or users): its ids and, per field, (kind, values, separator)."""

    table: Table
    id_col: int
    fields: Dict[str, Tuple[str, int, str]]  # name -> (kind "token"/"token_seq", column, sep)
    default: Tuple[str, ...]


@dataclass
class Raw:
    name: str
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    item_side: Optional[Side] = None
    user_side: Optional[Side] = None


def _find_column(table: Table, wanted: Optional[str], role: str, names: Sequence[str]) -> int:
    lowered = [h.lower() for h in table.header]
    candidates = [wanted] if wanted is not None else list(names)
    for c in candidates:
        if c.lower() in lowered:
            return lowered.index(c.lower())
    keyword = _COLUMN_KEYWORDS[role]
    hint = f"{keyword}={wanted!r}" if wanted is not None else f"one of {list(names)}"
    raise ValueError(
        f"{table.path}: no {role} column ({hint}); the header has {table.header}. "
        f"Name it with load(..., {keyword}=...), or rename it in the header to one of "
        f"{list(names)}"
    )


def _find_columns(table: Table, cols: Sequence[Optional[str]],
                  names: Sequence[Sequence[str]]) -> Tuple[int, int, int]:  # fmt: skip
    """The user, item and timestamp columns (``cols``: the names asked for, or None for the
    first of ``names`` found); three distinct columns."""
    roles = ("user", "item", "timestamp")
    found = tuple(_find_column(table, c, r, n) for c, r, n in zip(cols, roles, names))
    if len(set(found)) < 3:
        taken = [f"{r}={table.header[j]!r}" for r, j in zip(roles, found)]
        raise ValueError(f"{table.path}: the user, item and timestamp columns must differ, got "
                         f"{', '.join(taken)}")  # fmt: skip
    return found


def _read_atomic_table(path: Path) -> Tuple[Table, List[str]]:
    """The rows of a RecBole atomic file; the header becomes the field names, and their types."""
    table = read_table(path, "\t")
    names, kinds = [], []
    for tok in table.header:
        name, colon, kind = tok.strip().partition(":")
        if not colon or not name:
            raise ValueError(f"{path}:1: header field {tok!r} is not of the form 'name:type'")
        names.append(name)
        kinds.append(kind)
    table.header = names
    return table, kinds


def _read_atomic_side(path: Path, id_field: str) -> Side:
    table, kinds = _read_atomic_table(path)
    if id_field not in table.header:
        raise ValueError(f"{path}: no {id_field!r} field; the header has {table.header}")
    id_col = table.header.index(id_field)
    fields = {
        n: (k, j, " ")
        for j, (n, k) in enumerate(zip(table.header, kinds))
        if j != id_col and k in ("token", "token_seq")
    }
    return Side(table, id_col, fields, tuple(fields))


def read_atomic(path: Path, user_col, item_col, time_col) -> Raw:
    table, _ = _read_atomic_table(path)
    u, i, t = _find_columns(table, (user_col, item_col, time_col),
                            (("user_id", "user"), ("item_id", "item"), ("timestamp", "time")))  # fmt: skip
    users, items = parse_ids(table, u, "user"), parse_ids(table, i, "item")
    raw = Raw(path.stem, users, items, parse_timestamps(table, t))
    item_path, user_path = _side_paths(path, "atomic")
    if item_path.is_file():
        raw.item_side = _read_atomic_side(item_path, table.header[i])
    if user_path.is_file():
        raw.user_side = _read_atomic_side(user_path, table.header[u])
    return raw


def read_ml1m(path: Path) -> Raw:
    table = read_table(path, "::", ["user", "item", "rating", "timestamp"])
    name = path.parent.name or path.stem
    raw = Raw(
        name,
        parse_ids(table, 0, "user"),
        parse_ids(table, 1, "item"),
        parse_timestamps(table, 3),
    )
    movies, users = _side_paths(path, "ml-1m")
    if movies.is_file():
        t = read_table(movies, "::", ["item", "title", "genre"])
        raw.item_side = Side(t, 0, {"genre": ("token_seq", 2, "|")}, ("genre",))
    if users.is_file():
        t = read_table(users, "::", ["user", "gender", "age", "occupation", "zip_code"])
        fields = {n: ("token", j, "") for j, n in enumerate(t.header) if j > 0}
        raw.user_side = Side(t, 0, fields, ("gender", "age", "occupation"))
    return raw


def read_csv(path: Path, delimiter: Optional[str], user_col, item_col, time_col) -> Raw:
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    table = read_table(path, delimiter, quoting=True)
    table.header = [h.strip() for h in table.header]
    u, i, t = _find_columns(table, (user_col, item_col, time_col),
                            [_COLUMN_NAMES[r] for r in ("user", "item", "timestamp")])  # fmt: skip
    for j in (u, i, t):
        table.columns[j] = [v.strip() for v in table.columns[j]]
    return Raw(
        path.stem,
        parse_ids(table, u, "user"),
        parse_ids(table, i, "item"),
        parse_timestamps(table, t),
    )


def _side_paths(file: Path, fmt: str) -> Tuple[Optional[Path], Optional[Path]]:
    """(item side file, user side file) that a file of format ``fmt`` is read with, when
    present."""
    if fmt == "atomic":
        return file.with_suffix(".item"), file.with_suffix(".user")
    if fmt == "ml-1m":
        return file.parent / "movies.dat", file.parent / "users.dat"
    return None, None


def source_files(file: Path, fmt: str) -> List[Path]:
    """Every file :func:`spnn_fast.data.load` reads for ``file`` of format ``fmt``: the file
    and the side files beside it that exist."""
    return [file] + [p for p in _side_paths(file, fmt) if p is not None and p.is_file()]


def resolve(path: Path, fmt: Optional[str]) -> Tuple[Path, str]:
    """(file, format) for a path given to :func:`load`."""
    if fmt is not None and fmt not in _FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {list(_FORMATS)}")
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if (fmt in (None, "atomic")) and len(inters) == 1:
            return inters[0], "atomic"
        if fmt in (None, "ml-1m") and (path / "ratings.dat").is_file():
            return path / "ratings.dat", "ml-1m"
        csvs = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv"))
        if fmt in (None, "csv") and len(csvs) == 1:
            return csvs[0], "csv"
        raise ValueError(
            f"{path}: found no single data file to read (looked for one *.inter, ratings.dat, "
            f"or one *.csv / *.tsv; found {len(inters)} .inter and {len(csvs)} csv files). "
            f"Pass the file itself"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if fmt is not None:
        return path, fmt
    suffix = path.suffix.lower()
    if suffix == ".inter":
        return path, "atomic"
    if suffix == ".dat":
        return path, "ml-1m"
    if suffix in (".csv", ".tsv", ".txt"):
        return path, "csv"
    raise ValueError(
        f"{path}: cannot tell the format from the name; pass format= one of {list(_FORMATS)}"
    )
