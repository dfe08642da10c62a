"""The columnar reading path of :func:`spnn_fast.data.load`: pyarrow parses the file straight
into arrow columns, and ids and timestamps become integer numpy arrays without a Python object
per row (under 100 bytes per event at the peak, the arrays kept included, instead of 540).

pyarrow is optional: :func:`modules` is None without it, and the loader then reads with the csv
reader of ``spnn_fast._tables``. The two give the same arrays and the same errors; pyarrow reads
only files whose bytes it splits exactly as Python's csv reader does (:func:`plain_file`), and a
value error found here is placed on its line by the csv reader, which reads to that row.
"""

from __future__ import annotations

import codecs
import csv
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from spnn_fast._tables import (
    Ids,
    empty_id,
    is_number,
    not_a_number,
    not_whole,
    timestamp_values,
)

__all__ = ["Unsure", "first_row", "ids", "modules", "parquet", "plain_file", "read_strings",
           "release", "timestamps", "to_numpy"]  # fmt: skip

_BLOCK = 1 << 22
_INT64_MIN = np.iinfo(np.int64).min
# Bytes that make a file the csv reader's alone: control characters other than tab and line
# ends (Python's str.strip() and \s take \x1c-\x1f for whitespace, pyarrow does not).
_NOT_CONTROL = bytes(c for c in range(256) if c >= 32 or c in (9, 10, 13))
_QUOTE, _LF, _CR = 34, 10, 13
_INT = r"^[+-]?[0-9]+$"
_FLOAT = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


class Unsure(Exception):
    """pyarrow may not read this file as the csv reader does: the csv reader reads it."""


def modules():
    """``(pyarrow, pyarrow.compute, pyarrow.csv)``, or None where pyarrow is not installed
    (imported on each call, so that a test can hide it)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    return pa, pc, pacsv


def parquet():
    """``pyarrow.parquet``, or ImportError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "reading Parquet files needs pyarrow: pip install pyarrow (or pip install "
            "'spnn_fast[arrow]')"
        ) from None
    return pq


def plain_file(path: Path, delimiter: str, quoting: bool) -> bool:
    """Whether pyarrow splits ``path`` into the fields Python's csv reader gives: UTF-8, no
    control character but tab and line ends, ``\\r`` only before ``\\n``, no line longer than
    csv's field limit, and with ``quoting`` every quote opens a field (after a separator or a
    line end), closes one (before a separator or a line end) or is doubled inside one, and no
    line end lies inside quotes. Read in blocks."""
    if len(delimiter) != 1 or not 32 < ord(delimiter) < 127 and delimiter != "\t":
        return False
    if quoting and delimiter == '"':
        return False
    decoder = codecs.getincrementaldecoder("utf-8")()
    sep, window = ord(delimiter), _window()
    prev, parity = _LF, 0
    with open(path, "rb") as f:
        block = f.read(_BLOCK)
        while block:
            following = f.read(_BLOCK)
            if not (block.isascii() and not decoder.getstate()[0]):
                try:
                    decoder.decode(block, final=not following)
                except UnicodeDecodeError:
                    return False
            if block.translate(None, _NOT_CONTROL) or not _short_lines(block, window):
                return False
            if b"\r" in block or quoting and (parity or b'"' in block):
                b = np.frombuffer(block, dtype=np.uint8)
                # the byte before and after each byte (a line end at either end of the file)
                ext = np.empty(len(b) + 2, dtype=np.uint8)
                ext[0], ext[1:-1], ext[-1] = prev, b, following[0] if following else _LF
                if (ext[2:][b == _CR] != _LF).any():
                    return False
                if quoting:
                    parity = _quotes_ok(b, ext, sep, parity)
                    if parity is None:
                        return False
            prev, block = block[-1], following
    return not parity and not decoder.getstate()[0]


def _window() -> int:
    """A power of two ``w`` dividing the block size such that a line longer than csv's field
    limit holds a whole aligned window of ``w`` bytes."""
    return min(_BLOCK, 1 << max(0, ((csv.field_size_limit() + 2) // 2).bit_length() - 1))


def _short_lines(block: bytes, window: int) -> bool:
    """Every whole aligned window of the block holds a line end (so no line runs past csv's
    field limit, which pyarrow does not have)."""
    return all(block.find(b"\n", s, s + window) >= 0
               for s in range(0, len(block) - window + 1, window))  # fmt: skip


def _quotes_ok(b: np.ndarray, ext: np.ndarray, sep: int, parity: int) -> Optional[int]:
    """The parity of the quotes seen after this block, or None where a quote is not clean."""
    q = b == _QUOTE
    if not parity and not q.any():
        return 0
    # Quotes before each byte, mod 2 (uint8 wraps at 256, an even number).
    inside = ((np.cumsum(q, dtype=np.uint8) - q + parity) & 1).astype(bool)
    if (inside & ((b == _LF) | (b == _CR))).any():
        return None
    before, after = ext[:-2], ext[2:]
    opening = q & ~inside
    ok_open = (before == sep) | (before == _LF) | (before == _QUOTE)
    closing = q & inside
    ok_close = (after == sep) | (after == _LF) | (after == _CR) | (after == _QUOTE)
    if (opening & ~ok_open).any() or (closing & ~ok_close).any():
        return None
    return (parity + int(q.sum())) & 1


def first_row(path: Path, delimiter: str, quoting: bool) -> Optional[Tuple[List[str], int]]:
    """(the first non-blank row, the byte offset after its line) of a :func:`plain_file`, or
    None when every line is blank."""
    options = dict(skipinitialspace=True) if quoting else dict(quoting=csv.QUOTE_NONE)
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            text = line.decode("utf-8")
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]
            offset += len(line)
            row = next(csv.reader([text], delimiter=delimiter, **options), [])
            if row and not (len(row) == 1 and not row[0].strip()):
                return row, offset
    return None


def read_strings(path: Path, offset: int, columns: int, wanted: List[int], delimiter: str,
                 quoting: bool) -> list:  # fmt: skip
    """The columns ``wanted`` of the data rows of a :func:`plain_file` from byte ``offset``,
    as arrow string columns; :class:`Unsure` for a row of the wrong width (the csv reader then
    names it)."""
    pa, _, pacsv = modules()
    names = [f"c{j}" for j in range(columns)]

    def blank(row) -> str:  # the csv reader skips a line of one field of whitespace
        return "skip" if row.actual_columns == 1 and not row.text.strip() else "error"

    read = pacsv.ReadOptions(column_names=names, block_size=1 << 24)
    parse = pacsv.ParseOptions(
        delimiter=delimiter, quote_char='"' if quoting else False, double_quote=True,
        escape_char=False, newlines_in_values=False, ignore_empty_lines=True,
        invalid_row_handler=blank,
    )  # fmt: skip
    convert = pacsv.ConvertOptions(
        include_columns=[names[j] for j in wanted],
        column_types={names[j]: pa.string() for j in wanted},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    with pa.OSFile(str(path)) as f:
        f.seek(offset)
        try:
            table = pacsv.read_csv(f, read_options=read, parse_options=parse,
                                   convert_options=convert)  # fmt: skip
        except pa.ArrowInvalid as e:
            raise Unsure(str(e)) from None
    cols = [table.column(names[j]) for j in wanted]
    if any(c.null_count for c in cols):
        raise Unsure("null strings")
    return cols


def release() -> None:
    """Hand the memory pyarrow's pool keeps of freed columns back to the system (its
    allocator keeps it otherwise, and the next step allocates numpy arrays, not arrow ones)."""
    modules()[0].default_memory_pool().release_unused()


def to_numpy(col, dtype=None) -> np.ndarray:
    """A chunked arrow column as one numpy array."""
    chunks = [c.to_numpy(zero_copy_only=False) for c in col.chunks]
    if not chunks:
        return np.zeros(0, dtype=dtype or np.int64)
    out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return out if dtype is None else out.astype(dtype, copy=False)


def _canonical(values) -> Optional[np.ndarray]:
    """int64 values when every string of the arrow array ``values`` is a canonical integer
    (the rule of ``spnn_fast._tables.canonical_ints``, which also refuses -2**63); else None."""
    pa, pc, _ = modules()
    try:
        ints = pc.cast(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if not pc.all(pc.equal(pc.cast(ints, pa.string()), values)).as_py():
        return None
    out = ints.to_numpy(zero_copy_only=False)
    return None if (out == _INT64_MIN).any() else out


_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)


def _decimal_ints(col):
    """The int64 column of a string column whose every value is a canonical non-negative
    integer (ASCII digits without a leading zero), else None: one pass, no hashing of text."""
    pa, pc, _ = modules()
    try:
        ints = pc.cast(col, pa.int64())
    except pa.ArrowInvalid:
        return None
    if not pc.all(pc.ascii_is_decimal(col)).as_py():
        return None  # a sign, or another spelling pyarrow reads ("0x1f")
    values = to_numpy(ints, np.int64)
    digits = np.searchsorted(_POW10, values, side="right") + 1
    lengths = to_numpy(pc.binary_length(col), np.int64)
    return ints if np.array_equal(digits, lengths) else None


def _dense_ids(values: np.ndarray) -> Optional[Ids]:
    """Integer ids factorized through a table over their range (no sort, no hash), where the
    range is not much larger than the rows; else None."""
    lo, hi = (int(values.min()), int(values.max())) if len(values) else (0, 0)
    if hi - lo > 4 * len(values) + (1 << 20):
        return None
    shifted = values - lo
    present = np.zeros(hi - lo + 1, dtype=bool)
    present[shifted] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return Ids(rank[shifted], np.flatnonzero(present).astype(np.int64) + lo)


def ids(col, what: str, where: Callable[[int], str], *, strip: bool = False) -> Ids:
    """Factorized raw ids of an arrow column (strings or integers): int64 ids when every
    string is a canonical integer, else the strings; ``strip`` drops whitespace around each
    (as ``str.strip``). An empty id is an error naming its row's place ``where(i)``."""
    pa, pc, _ = modules()
    ints = _decimal_ints(col) if pa.types.is_string(col.type) else None
    if ints is not None:  # the common case, factorized as integers
        col = ints
    if pa.types.is_int64(col.type):
        dense = _dense_ids(to_numpy(col, np.int64))
        if dense is not None:
            return dense
    encoded = pc.dictionary_encode(col)
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks])
    codes = codes.astype(np.int64, copy=False)
    dictionary = encoded.chunk(encoded.num_chunks - 1).dictionary
    if pa.types.is_string(dictionary.type) or pa.types.is_large_string(dictionary.type):
        if strip:  # stripping may join ids (" a" and "a"): encode the stripped values again
            again = pc.dictionary_encode(pc.utf8_trim_whitespace(dictionary))
            codes = again.indices.to_numpy(zero_copy_only=False).astype(np.int64)[codes]
            dictionary = again.dictionary
        empty = pc.index(dictionary, "").as_py()
        if empty >= 0:
            raise ValueError(empty_id(where(int(np.argmax(codes == empty))), what))
        values = _canonical(dictionary)
        if values is None:
            values = np.array(dictionary.to_pylist())
    else:
        values = dictionary.to_numpy(zero_copy_only=False)
    order = np.argsort(values, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return Ids(rank[codes], values[order])


def timestamps(col, where: Callable[[int], str], *, strip: bool = False) -> np.ndarray:
    """int64 seconds of an arrow string column, read as ``spnn_fast._tables.parse_timestamps``
    reads strings (``strip``: of the stripped strings), with its errors."""
    pa, pc, _ = modules()
    for stripped in (False, True) if strip else (False,):
        if stripped:
            col = pc.utf8_trim_whitespace(col)
        try:  # the common case: every value a canonical integer
            ints = pc.cast(col, pa.int64())
            if pc.all(pc.equal(pc.cast(ints, pa.string()), col)).as_py():
                return to_numpy(ints, np.int64)
        except pa.ArrowInvalid:
            pass
    trimmed = pc.utf8_trim(col, characters=" \t")
    if pc.all(pc.match_substring_regex(trimmed, _INT)).as_py():
        try:
            return to_numpy(pc.cast(pc.replace_substring_regex(trimmed, r"^\+", ""), pa.int64()))
        except pa.ArrowInvalid:
            pass  # beyond int64: read as floats, as the csv reader does
    number = pc.match_substring_regex(trimmed, _FLOAT)
    if not pc.all(number).as_py():
        i = int(np.argmax(~to_numpy(number, bool)))
        value = col[i].as_py()
        if is_number(value):  # whitespace other than spaces and tabs: the csv reader's rules
            return timestamp_values(col.to_pylist(), where)
        raise ValueError(not_a_number(where(i), value))
    f = to_numpy(pc.cast(trimmed, pa.float64()), np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**53)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(not_whole(where(i), col[i].as_py()))
    return f.astype(np.int64)
