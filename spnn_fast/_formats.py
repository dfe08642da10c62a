"""The file formats :func:`spnn_fast.data.load` reads: each gives the raw (user, item, time)
columns and, where the format has them, the item and user side files. Event files are read by
pyarrow where it is installed (``spnn_fast._arrow``), else by the csv reader
(``spnn_fast._tables``): the same arrays and the same errors either way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from spnn_fast import _arrow
from spnn_fast._tables import (
    Ids,
    Table,
    check_rows,
    line_of_row,
    not_whole,
    parse_ids,
    parse_timestamps,
    read_table,
)

__all__ = ["Raw", "Side", "read_atomic", "read_csv", "read_ml1m", "read_parquet", "resolve",
           "source_files"]  # fmt: skip

_FORMATS = ("atomic", "ml-1m", "csv", "parquet")
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
    """The events of a file: factorized users and items, timestamps as written (int64), and
    ``time_unit`` where the file states it (a Parquet timestamp column)."""

    name: str
    users: Ids
    items: Ids
    timestamps: np.ndarray
    item_side: Optional[Side] = None
    user_side: Optional[Side] = None
    path: Optional[Path] = None
    time_unit: Optional[str] = None


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


def _header(path: Path, names: List[str]) -> Table:
    return Table(path, names, [], np.zeros(0, dtype=np.int64))


def _atomic_names(path: Path, header: List[str]) -> Tuple[List[str], List[str]]:
    """The field names and types of a RecBole atomic header (``name:type`` fields)."""
    names, kinds = [], []
    for tok in header:
        name, colon, kind = tok.strip().partition(":")
        if not colon or not name:
            raise ValueError(f"{path}:1: header field {tok!r} is not of the form 'name:type'")
        names.append(name)
        kinds.append(kind)
    return names, kinds


def _read_atomic_table(path: Path) -> Tuple[Table, List[str]]:
    """The rows of a RecBole atomic file; the header becomes the field names, and their types."""
    table = read_table(path, "\t")
    table.header, kinds = _atomic_names(path, table.header)
    return table, kinds


def _one_row_per_id(table: Table, id_col: int, what: str) -> None:
    """A ValueError naming the first row whose id an earlier row holds (its features would
    silently replace the earlier row's)."""
    ids = np.array(table.column(id_col))
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    again = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(len(ids)))
    if len(again):
        i = int(again[0])
        earlier = int(table.lines[first[inverse.reshape(-1)[i]]])
        raise ValueError(
            f"{table.where(i)}: {what} id {table.column(id_col)[i]!r} is listed again (first on "
            f"line {earlier}); each {what} takes one row"
        )


def _read_atomic_side(path: Path, id_field: str, what: str) -> Side:
    table, kinds = _read_atomic_table(path)
    if id_field not in table.header:
        raise ValueError(f"{path}: no {id_field!r} field; the header has {table.header}")
    id_col = table.header.index(id_field)
    _one_row_per_id(table, id_col, what)
    fields = {
        n: (k, j, " ")
        for j, (n, k) in enumerate(zip(table.header, kinds))
        if j != id_col and k in ("token", "token_seq")
    }
    return Side(table, id_col, fields, tuple(fields))


Columns = Callable[[List[str]], Tuple[int, int, int]]
_BOM = b"\xef\xbb\xbf"


def _read_arrow(path: Path, sep: str, header: Optional[List[str]], quoting: bool,
                columns: Columns, strip: bool = False) -> Optional[tuple]:  # fmt: skip
    """(users, items, timestamps, header) of an event file read by pyarrow; None where the
    csv reader must read it (no pyarrow, or bytes pyarrow may split otherwise). ``columns``
    picks the (user, item, time) columns from the header. Errors are the csv reader's."""
    if _arrow.modules() is None or (len(sep) > 1 and (sep != "::" or header is None)):
        return None
    delimiter = ":" if sep == "::" else sep
    if not _arrow.plain_file(path, delimiter, quoting):
        return None
    if header is None:
        found = _arrow.first_row(path, delimiter, quoting)
        if found is None:
            return None
        names, offset = found
    else:
        names, offset = header, None
    with open(path, "rb") as f:
        if offset is None:
            offset = 3 if f.read(3) == _BOM else 0
        f.seek(offset)
        if f.read(3) == _BOM:
            # pyarrow drops a BOM at the start of the bytes it reads; the csv reader keeps one
            # past the file's start in the field (a file of concatenated exports): its rules
            return None
    try:
        wanted = columns(names)
    except ValueError:
        check_rows(path, sep, header, quoting=quoting)  # the csv reader reports rows first
        raise
    width = len(names)
    if sep == "::":  # "a::b" is "a", "", "b" split at ":"; other colons: the csv reader reads it
        width, wanted = 2 * width - 1, [2 * j for j in wanted] + list(range(1, 2 * width - 1, 2))
    try:
        cols = _arrow.read_strings(path, offset, width, wanted, delimiter, quoting)
    except _arrow.Unsure:
        check_rows(path, sep, header, quoting=quoting)
        return None
    if len(cols[0]) == 0:
        check_rows(path, sep, header, quoting=quoting)
        return None
    pc = _arrow.modules()[1]
    if any(pc.max(pc.binary_length(c)).as_py() for c in cols[3:]):
        return None

    def where(i: int) -> str:
        return f"{path}:{line_of_row(path, sep, header, quoting, i)}"

    # Each column's text is dropped and its memory handed back once it is converted.
    users = _arrow.ids(cols.pop(0), "user", where, strip=strip)
    _arrow.release()
    items = _arrow.ids(cols.pop(0), "item", where, strip=strip)
    _arrow.release()
    ts = _arrow.timestamps(cols.pop(0), where, strip=strip)
    del cols
    _arrow.release()
    return users, items, ts, names


def read_atomic(path: Path, user_col, item_col, time_col) -> Raw:
    def columns(header: List[str]) -> Tuple[int, int, int]:
        return _find_columns(_header(path, _atomic_names(path, header)[0]),
                             (user_col, item_col, time_col),
                             (("user_id", "user"), ("item_id", "item"), ("timestamp", "time")))  # fmt: skip

    got = _read_arrow(path, "\t", None, False, columns)
    if got is not None:
        users, items, ts, header = got
        names = _atomic_names(path, header)[0]
        u, i, _ = columns(header)
    else:
        table, _ = _read_atomic_table(path)
        names = table.header
        u, i, t = _find_columns(table, (user_col, item_col, time_col),
                                (("user_id", "user"), ("item_id", "item"), ("timestamp", "time")))  # fmt: skip
        users, items = Ids.of(parse_ids(table, u, "user")), Ids.of(parse_ids(table, i, "item"))
        ts = parse_timestamps(table, t)
    raw = Raw(path.stem, users, items, ts, path=path)
    item_path, user_path = _side_paths(path, "atomic")
    if item_path.is_file():
        raw.item_side = _read_atomic_side(item_path, names[i], "item")
    if user_path.is_file():
        raw.user_side = _read_atomic_side(user_path, names[u], "user")
    return raw


def read_ml1m(path: Path) -> Raw:
    header = ["user", "item", "rating", "timestamp"]
    name = path.parent.name or path.stem
    got = _read_arrow(path, "::", header, False, lambda _: (0, 1, 3))
    if got is not None:
        raw = Raw(name, *got[:3], path=path)
    else:
        table = read_table(path, "::", header)
        users, items = parse_ids(table, 0, "user"), parse_ids(table, 1, "item")
        raw = Raw(name, Ids.of(users), Ids.of(items), parse_timestamps(table, 3), path=path)
    movies, users = _side_paths(path, "ml-1m")
    if movies.is_file():
        t = read_table(movies, "::", ["item", "title", "genre"])
        _one_row_per_id(t, 0, "item")
        raw.item_side = Side(t, 0, {"genre": ("token_seq", 2, "|")}, ("genre",))
    if users.is_file():
        t = read_table(users, "::", ["user", "gender", "age", "occupation", "zip_code"])
        _one_row_per_id(t, 0, "user")
        fields = {n: ("token", j, "") for j, n in enumerate(t.header) if j > 0}
        raw.user_side = Side(t, 0, fields, ("gender", "age", "occupation"))
    return raw


def read_csv(path: Path, delimiter: Optional[str], user_col, item_col, time_col) -> Raw:
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    cols = (user_col, item_col, time_col)
    names = [_COLUMN_NAMES[r] for r in ("user", "item", "timestamp")]

    def columns(header: List[str]) -> Tuple[int, int, int]:
        return _find_columns(_header(path, [h.strip() for h in header]), cols, names)

    got = _read_arrow(path, delimiter, None, True, columns, strip=True)
    if got is not None:
        return Raw(path.stem, *got[:3], path=path)
    table = read_table(path, delimiter, quoting=True)
    table.header = [h.strip() for h in table.header]
    u, i, t = _find_columns(table, cols, names)
    for j in (u, i, t):
        table.columns[j] = [v.strip() for v in table.columns[j]]
    users, items = parse_ids(table, u, "user"), parse_ids(table, i, "item")
    return Raw(path.stem, Ids.of(users), Ids.of(items), parse_timestamps(table, t), path=path)


def read_parquet(path: Path, user_col, item_col, time_col) -> Raw:
    """The events of a Parquet file: integer or string ids (strings that are all canonical
    integers become int64 ids, as in a CSV file), and integer, integral float, string or
    timestamp times (a timestamp column gives its unit as ``Raw.time_unit``)."""
    pq = _arrow.parquet()
    pa, pc, _ = _arrow.modules()
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a Parquet file pyarrow can read ({e})") from None
    cols = (user_col, item_col, time_col)
    picked = _find_columns(_header(path, names), cols,
                           [_COLUMN_NAMES[r] for r in ("user", "item", "timestamp")])  # fmt: skip
    table = pq.read_table(path, columns=[names[j] for j in picked])
    if table.num_rows == 0:
        raise ValueError(f"{path}: the file holds no data rows")  # as a CSV file without any
    u, i, t = (table.column(j) for j in range(3))

    def where(k: int) -> str:
        return f"{path}: row {k} (from 0)"

    for col, j, what in ((u, picked[0], "user id"), (i, picked[1], "item id"), (t, picked[2], "timestamp")):  # fmt: skip
        if col.null_count:
            k = int(np.argmax(_arrow.to_numpy(pc.is_null(col), bool)))
            raise ValueError(f"{where(k)}: the {what} is missing (null in column {names[j]!r})")
    users, items = (_parquet_ids(c, f"{path}: the {what} column {names[j]!r}", what, where)
                    for c, j, what in ((u, picked[0], "user"), (i, picked[1], "item")))  # fmt: skip
    ts, unit = _parquet_times(t, f"{path}: the timestamp column {names[picked[2]]!r}", where)
    del table, u, i, t
    _arrow.release()
    return Raw(path.stem, users, items, ts, path=path, time_unit=unit)


def _parquet_ids(col, column: str, what: str, where) -> Ids:
    pa, pc, _ = _arrow.modules()
    kind = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if pa.types.is_dictionary(col.type):
        col = col.cast(kind)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if pc.any(pc.match_substring(col, "\x00")).as_py():
            k = int(np.argmax(_arrow.to_numpy(pc.match_substring(col, "\x00"), bool)))
            raise ValueError(f"{where(k)}: the {what} id {col[k].as_py()!r} holds a NUL character")
        return _arrow.ids(col, what, where)
    if pa.types.is_integer(kind):
        big = pa.types.is_uint64(kind) and len(col) and pc.max(col).as_py() >= 2**63
        return _arrow.ids(col.cast(pa.uint64() if big else pa.int64()), what, where)
    raise ValueError(f"{column} holds {kind}; ids must be integers or strings")


def _parquet_times(col, column: str, where) -> Tuple[np.ndarray, Optional[str]]:
    pa, pc, _ = _arrow.modules()
    kind = col.type
    if pa.types.is_date(kind):
        col, kind = col.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        return _arrow.to_numpy(col.cast(pa.int64()), np.int64), kind.unit
    if pa.types.is_integer(kind):
        if pa.types.is_uint64(kind) and len(col) and pc.max(col).as_py() >= 2**63:
            big = pc.greater_equal(col, pa.scalar(2**63, pa.uint64()))
            k = int(np.argmax(_arrow.to_numpy(big, bool)))
            raise ValueError(f"{where(k)}: timestamp {col[k].as_py()} does not fit int64")
        return _arrow.to_numpy(col.cast(pa.int64()), np.int64), None
    if pa.types.is_floating(kind):
        f = _arrow.to_numpy(col.cast(pa.float64()), np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**53)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(not_whole(where(k), str(f[k])))
        return f.astype(np.int64), None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _arrow.timestamps(col, where), None
    raise ValueError(
        f"{column} holds {kind}; timestamps must be integers, whole floats, strings or timestamps"
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
        parquets = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet")
        if fmt in (None, "parquet") and len(parquets) == 1:
            return parquets[0], "parquet"
        raise ValueError(
            f"{path}: found no single data file to read (looked for one *.inter, ratings.dat, "
            f"one *.csv / *.tsv or one *.parquet; found {len(inters)} .inter, {len(csvs)} csv "
            f"and {len(parquets)} parquet files). Pass the file itself"
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
    if suffix == ".parquet":
        return path, "parquet"
    raise ValueError(
        f"{path}: cannot tell the format from the name; pass format= one of {list(_FORMATS)}"
    )
