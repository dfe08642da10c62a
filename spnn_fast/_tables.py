"""Delimited text files read into columns of strings (Python's ``csv`` reader, a stream of the
file's lines), and the parsing of their id and timestamp columns, with errors that name the file
and line. This is the reader of every file where pyarrow is missing, and the one whose results
and errors the pyarrow reader (``spnn_fast._arrow``) reproduces exactly."""

from __future__ import annotations

import codecs
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

__all__ = [
    "Ids",
    "Table",
    "canonical_ints",
    "check_rows",
    "empty_id",
    "is_number",
    "iter_rows",
    "line_of_row",
    "not_a_number",
    "not_whole",
    "parse_ids",
    "parse_timestamps",
    "read_table",
    "read_text",
    "text_encoding",
    "timestamp_values",
]

# A separator of several characters (MovieLens-1M's "::") is read as this one, which no text
# field of those files holds.
_UNIT_SEPARATOR = "\x1f"
_BLOCK = 1 << 22


def text_encoding(path: Path) -> str:
    """How the loader decodes ``path``: ``"utf-8-sig"`` (UTF-8 without a leading BOM) when the
    whole file is UTF-8, else ``"latin-1"`` (MovieLens .dat files). Read in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            for block in iter(lambda: f.read(_BLOCK), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8-sig"


def read_text(path: Path) -> str:
    """The file's text: UTF-8, else latin-1 (MovieLens .dat files); without a BOM."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text[1:] if text.startswith("\ufeff") else text


def _blank(path: Path, encoding: str) -> bool:
    """Whether the decoded file holds only whitespace."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            if decoder.decode(block).strip():
                return False
    return not decoder.decode(b"", final=True).strip()


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


@dataclass
class Ids:
    """Raw ids factorized: ``values`` sorted and distinct (int64 or fixed-width strings, as
    ``np.unique`` gives them), ``codes`` the int64 index of each row's id in ``values``."""

    codes: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, raw: np.ndarray) -> Ids:
        values, codes = np.unique(raw, return_inverse=True)
        return cls(codes.reshape(-1).astype(np.int64, copy=False), values)

    def subset(self, keep: np.ndarray) -> Ids:
        """The ids of the rows ``keep`` (a bool mask), refactorized: ids no kept row holds go."""
        codes = self.codes[keep]
        used = np.zeros(len(self.values), dtype=bool)
        used[codes] = True
        remap = np.cumsum(used) - 1
        return Ids(remap[codes], self.values[used])


def _is_blank(row: List[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _readable_rows(reader, path: Path) -> Iterator[List[str]]:
    """The rows of a csv reader; its errors (a field over ``csv.field_size_limit()``, which one
    unclosed quote makes of the rest of a file) as a ValueError naming the row's first line."""
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = " (an unclosed quote?)" if "field larger" in str(e) else ""
            raise ValueError(
                f"{path}:{first}: the row starting on this line cannot be read: {e}{hint}"
            ) from None
        yield row


def iter_rows(
    path: Path, sep: str, header: Optional[List[str]] = None, *, quoting: bool = False
) -> Iterator:
    """Yield the header, then ``(line number, fields)`` of each data row of ``path`` split at
    ``sep``; with ``header=None`` the first row is the header (None when there is no row).
    ``quoting``: fields may be quoted as in CSV (spaces after a separator are dropped). Blank
    lines are skipped; any other row of the wrong width is an error naming its line."""
    encoding = text_encoding(path)
    if _blank(path, encoding):
        raise ValueError(f"{path}: the file is empty")
    options = dict(skipinitialspace=True) if quoting else dict(quoting=csv.QUOTE_NONE)
    with open(path, encoding=encoding, newline="") as f:
        lines, given = f, sep
        if len(given) > 1:
            lines, sep = (line.replace(given, _UNIT_SEPARATOR) for line in f), _UNIT_SEPARATOR
        shown = "'::'" if sep == _UNIT_SEPARATOR else repr(sep)
        reader = csv.reader(lines, delimiter=sep, **options)
        rows = _readable_rows(reader, path)
        if header is None:
            header = next((row for row in rows if not _is_blank(row)), None)
        yield header
        for row in rows:
            if _is_blank(row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: malformed row: expected {len(header)} fields "
                    f"separated by {shown}, got {len(row)}: {sep.join(row)[:120]!r}"
                )
            yield reader.line_num, row


def read_table(
    path: Path, sep: str, header: Optional[List[str]] = None, *, quoting: bool = False
) -> Table:
    """The rows of ``path`` (see :func:`iter_rows`) as columns of strings."""
    rows = iter_rows(path, sep, header, quoting=quoting)
    header = next(rows)
    numbers: List[int] = []
    fields: List[List[str]] = []
    for number, row in rows:
        numbers.append(number)
        fields.append(row)
    if not fields:
        raise ValueError(f"{path}: the file holds no data rows")
    columns = [list(c) for c in zip(*fields)]
    return Table(path, header, columns, np.asarray(numbers, dtype=np.int64))


def check_rows(path: Path, sep: str, header: Optional[List[str]] = None, *,
               quoting: bool = False) -> int:  # fmt: skip
    """The number of data rows of ``path``, raising what :func:`read_table` raises (an empty
    file, no data rows, a malformed row) without keeping any row."""
    count = sum(1 for _ in _data_rows(path, sep, header, quoting))
    if not count:
        raise ValueError(f"{path}: the file holds no data rows")
    return count


def line_of_row(path: Path, sep: str, header: Optional[List[str]], quoting: bool, i: int) -> int:
    """The line number of data row ``i`` (0-based) of ``path``."""
    for k, (number, _) in enumerate(_data_rows(path, sep, header, quoting)):
        if k == i:
            return number
    raise IndexError(f"{path} holds no data row {i}")


def _data_rows(path: Path, sep: str, header: Optional[List[str]],
               quoting: bool) -> Iterator[Tuple[int, List[str]]]:  # fmt: skip
    rows = iter_rows(path, sep, header, quoting=quoting)
    next(rows)
    return rows


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
        raise ValueError(empty_id(table.where(values.index("")), what))
    ints = canonical_ints(values)
    return ints if ints is not None else np.array(values)


def is_number(value: str) -> bool:
    """Whether :func:`parse_timestamps` reads ``value`` as a number."""
    return _ASCII_FLOAT.fullmatch(value) is not None


def empty_id(where: str, what: str) -> str:
    return f"{where}: empty {what} id"


def not_a_number(where: str, value: str) -> str:
    return f"{where}: timestamp {value!r} is not a number (seconds expected)"


def not_whole(where: str, value: str) -> str:
    return (
        f"{where}: timestamp {value!r} is not a whole number of seconds "
        f"(it must be finite, integral and below 2**53 to convert to int64 exactly)"
    )


def parse_timestamps(table: Table, j: int) -> np.ndarray:
    """int64 seconds, exactly; fractional, non-finite or huge float values are errors."""
    return timestamp_values(table.column(j), table.where)


def timestamp_values(values: List[str], where: Callable[[int], str]) -> np.ndarray:
    """:func:`parse_timestamps` of the strings ``values``; ``where(i)`` names row ``i``."""
    ints = _ints(values)
    if ints is not None:
        return ints
    for i, v in enumerate(values):
        if not _ASCII_FLOAT.fullmatch(v):
            raise ValueError(not_a_number(where(i), v))
    f = np.array(values).astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**53)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(not_whole(where(i), values[i]))
    return f.astype(np.int64)
