"""Delimited text files read into columns of strings (Python's ``csv`` reader), and the
parsing of their id and timestamp columns, with errors that name the file and line."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

__all__ = ["Table", "canonical_ints", "parse_ids", "parse_timestamps", "read_table"]

# A separator of several characters (MovieLens-1M's "::") is read as this one, which no text
# field of those files holds.
_UNIT_SEPARATOR = "\x1f"


def read_text(path: Path) -> str:
    """The file's text: UTF-8, else latin-1 (MovieLens .dat files); without a BOM."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text[1:] if text.startswith("\ufeff") else text


@dataclass
class Table:
    """Columns of a delimited file, with the 1-based line number of each row for errors."""

    path: Path
    header: List[str]
    columns: List[List[str]]
    lines: np.ndarray

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"

    def column(self, j: int) -> List[str]:
        return self.columns[j]


def read_table(
    path: Path, sep: str, header: Optional[List[str]] = None, *, quoting: bool = False
) -> Table:
    """The rows of ``path`` split at ``sep``; with ``header=None`` the first row is the header.
    ``quoting``: fields may be quoted as in CSV (spaces after a separator are dropped). Blank
    lines are skipped; any other row of the wrong width is an error naming its line."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    if len(sep) > 1:
        text, sep = text.replace(sep, _UNIT_SEPARATOR), _UNIT_SEPARATOR
    options = dict(skipinitialspace=True) if quoting else dict(quoting=csv.QUOTE_NONE)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, **options)
    shown = "'::'" if sep == _UNIT_SEPARATOR else repr(sep)
    rows: List[List[str]] = []
    numbers: List[int] = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = row
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{path}:{reader.line_num}: malformed row: expected {len(header)} fields "
                f"separated by {shown}, got {len(row)}: {sep.join(row)[:120]!r}"
            )
        rows.append(row)
        numbers.append(reader.line_num)
    if not rows:
        raise ValueError(f"{path}: the file holds no data rows")
    columns = [list(c) for c in zip(*rows)]
    return Table(path, header, columns, np.asarray(numbers, dtype=np.int64))


_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)
_ASCII_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_ASCII_FLOAT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _ints(values: List[str]) -> Optional[np.ndarray]:
    """int64 values when every string is an integer in ASCII digits (None otherwise): Python's
    int() also reads other scripts' digits ("\u0663" is 3) and "1_000", which are not numbers
    here."""
    if not all(map(_ASCII_INT.fullmatch, values)):
        return None
    try:
        return np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, OverflowError):
        return None


def canonical_ints(values: List[str]) -> Optional[np.ndarray]:
    """int64 values when every string is an integer written canonically ("7", not "07" or
    "+7"), so converting loses no distinction between ids; None otherwise."""
    ints = _ints(values)
    if ints is None:
        return None
    # A non-canonical spelling of a number is longer than the canonical one.
    digits = np.searchsorted(_POW10, np.abs(ints), side="right") + 1 + (ints < 0)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    return ints if np.array_equal(digits, lengths) else None


def parse_ids(table: Table, j: int, what: str) -> np.ndarray:
    """Raw ids: int64 when every value is a canonical integer, else the strings."""
    values = table.column(j)
    if "" in values:
        raise ValueError(f"{table.where(values.index(''))}: empty {what} id")
    ints = canonical_ints(values)
    return ints if ints is not None else np.array(values)


def parse_timestamps(table: Table, j: int) -> np.ndarray:
    """int64 seconds, exactly; fractional, non-finite or huge float values are errors."""
    values = table.column(j)
    ints = _ints(values)
    if ints is not None:
        return ints
    for i, v in enumerate(values):
        if not _ASCII_FLOAT.fullmatch(v):
            raise ValueError(
                f"{table.where(i)}: timestamp {v!r} is not a number (seconds expected)"
            )
    f = np.array(values).astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**53)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{table.where(i)}: timestamp {values[i]!r} is not a whole number of seconds "
            f"(it must be finite, integral and below 2**53 to convert to int64 exactly)"
        )
    return f.astype(np.int64)
