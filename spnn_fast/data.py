"""Data sets: read interaction logs with item and user features into a :class:`Dataset`.

``load("ml-100k")`` gives MovieLens-100K (100,000 events of 943 users on 1,682 items) in the
RecBole atomic format: the files ship inside the ``recbole==1.2.1`` wheel, which is fetched once
with ``pip download --no-deps`` into the cache folder (``$SPNN_FAST_CACHE``, else
``$XDG_CACHE_HOME/spnn_fast``, else ``~/.cache/spnn_fast``) and read from there afterwards.

``load(path)`` reads, by the file name (or ``format=``):

* ``"atomic"``: a RecBole atomic ``.inter`` file (or a folder holding one), with ``<stem>.item``
  and ``<stem>.user`` beside it when present. Tab-separated; the header names each field as
  ``name:type`` (``token``, ``token_seq``, ``float``, ``float_seq``); ``token_seq`` values are
  space-separated.
* ``"ml-1m"``: MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, or a folder
  holding it), with ``movies.dat`` (genres) and ``users.dat`` (gender, age, occupation) beside it
  when present.
* ``"csv"``: a delimited file with a header row and user, item and timestamp columns (found by
  name, case-insensitively: ``user``/``user_id``, ``item``/``item_id``, ``timestamp``/``time``;
  ``user_col=`` etc. pick others). ``.csv`` and ``.txt`` are comma-separated, ``.tsv`` tab.

Timestamps become int64 seconds exactly: integers as written, floats only when finite, whole and
below 2**53; anything else is an error naming the file and line. Raw ids that are all canonical
integers become int64 ids, others stay strings. Users with fewer than ``min_events`` events are
dropped (leave-one-out needs 3) and the log is built from what is left, so items seen only by
dropped users vanish from the remapping.

Features (``token`` and ``token_seq`` fields of the side files) are int64 codes:

* ``Dataset.item_features[name]`` has ``V + 1`` rows indexed by the remapped item id (row 0 is
  padding); ``Dataset.user_features[name]`` has ``U`` rows indexed by the remapped user id.
* A ``token`` field is 1-D: code ``c`` in ``1..C`` for the C distinct values held by the kept
  items (users), sorted (numerically when all are integers); 0 for unknown / missing / padding.
  ``feature_vocab[name] = C + 1``.
* A ``token_seq`` field (genres) is a padded index matrix ``[rows, L]``: the codes of the row's
  values in file order, 0-padded to the longest row's length L. ``nn.Embedding(vocab, d,
  padding_idx=0)`` then a sum or mean over the last axis handles it; :func:`multi_hot` turns it
  into a float32 multi-hot matrix.
* A field named ``age`` (in the file or as the feature) whose values are all integers is bucketed
  as in MovieLens-1M: codes 1..7 for ``<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+`` (vocab 8),
  so ML-100K and ML-1M agree.
* ``feature_labels[name][c]`` is the raw value of code ``c`` (``""`` for code 0).

Item and user features live in one namespace for ``feature_vocab`` and ``feature_labels``: an
item field and a user field with the same name are an error (rename one with a mapping).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from spnn_fast._io import atomic_write
from spnn_fast.log import InteractionLog

__all__ = [
    "AGE_BUCKETS",
    "KNOWN_DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "cache_dir",
    "fetch",
    "load",
    "multi_hot",
]

logger = logging.getLogger("spnn_fast")

PathLike = Union[str, os.PathLike]
Fields = Optional[Union[Sequence[str], Mapping[str, str]]]

AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56], dtype=np.int64)
_FORMATS = ("atomic", "ml-1m", "csv")
_COLUMN_NAMES = {
    "user": ("user", "user_id"),
    "item": ("item", "item_id"),
    "timestamp": ("timestamp", "time"),
}

_RECBOLE = "recbole==1.2.1"
_ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
# (events, users, items) of the raw files; checked after parsing.
_ML100K_COUNTS = (100000, 943, 1682)

KNOWN_DATASETS: Dict[str, str] = {
    "ml-100k": "MovieLens-100K (RecBole atomic files from the recbole==1.2.1 wheel on PyPI)",
}
_NAMED_FIELDS = {
    "ml-100k": ({"class": "genre"}, ("age", "gender", "occupation")),
}


class DatasetUnavailableError(RuntimeError):
    """A named data set is neither cached nor downloadable (the message says how to provide it)."""


@dataclass
class Dataset:
    """An interaction log with its item and user features (see the module docstring).

    ``item_features[name]`` is ``[V + 1, ...]`` indexed by remapped item id (row 0 = padding),
    ``user_features[name]`` is ``[U, ...]`` indexed by remapped user id; both int64 codes with 0
    = unknown / padding. ``feature_vocab[name]`` counts the codes including 0.
    """

    name: str
    log: InteractionLog
    item_features: Dict[str, np.ndarray] = field(default_factory=dict)
    user_features: Dict[str, np.ndarray] = field(default_factory=dict)
    feature_vocab: Dict[str, int] = field(default_factory=dict)
    dropped_users: int = 0
    feature_labels: Dict[str, List[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        def shapes(feats: Dict[str, np.ndarray]) -> str:
            return ", ".join(f"{k}{list(v.shape)}" for k, v in feats.items())

        return (
            f"Dataset(name={self.name!r}, users={self.log.num_users}, "
            f"items={self.log.num_items}, events={self.log.num_events}, "
            f"item_features=({shapes(self.item_features)}), "
            f"user_features=({shapes(self.user_features)}), dropped_users={self.dropped_users})"
        )


def multi_hot(codes: np.ndarray, vocab: int) -> np.ndarray:
    """Padded index matrix ``[N, L]`` (0 = padding) -> float32 multi-hot ``[N, vocab - 1]``.

    Column ``c - 1`` is 1 when code ``c`` appears in the row.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be a 2-D integer matrix, got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"codes must lie in [0, {vocab}), got [{codes.min()}, {codes.max()}]")
    out = np.zeros((codes.shape[0], vocab), dtype=np.float32)
    np.put_along_axis(out, codes.astype(np.int64), 1.0, axis=1)
    return out[:, 1:]


# ---------------------------------------------------------------------------- cache / download
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


# ---------------------------------------------------------------------------- text parsing
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # MovieLens .dat files are latin-1
        text = raw.decode("latin-1")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


@dataclass
class _Table:
    """Columns of a delimited file, with the 1-based line number of each row for errors."""

    path: Path
    header: List[str]
    columns: List[List[str]]
    lines: np.ndarray

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"

    def column(self, j: int) -> List[str]:
        return self.columns[j]


def _split_lines(path: Path, text: str, sep: str, header: Optional[List[str]]) -> _Table:
    """Split ``text`` into rows of ``len(header)`` fields; with ``header=None`` the first line is
    the header. Blank lines are skipped; any other row of the wrong width is an error."""
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    lines = text.split("\n")
    first = 0
    if header is None:
        header = lines[0].split(sep)
        first = 1
    width = len(header)
    body = lines[first:]
    numbers = np.arange(first + 1, first + 1 + len(body), dtype=np.int64)
    # Counting separators per line and splitting the joined text once is several times faster
    # than splitting each line into its own list.
    seps = np.fromiter((line.count(sep) for line in body), dtype=np.int64, count=len(body))
    bad = np.flatnonzero(seps != width - 1)
    if len(bad):
        blank = [i for i in bad.tolist() if not body[i].strip()]
        real = np.setdiff1d(bad, np.asarray(blank, dtype=np.int64))
        if len(real):
            i = int(real[0])
            raise ValueError(
                f"{path}:{int(numbers[i])}: malformed row: expected {width} fields separated by "
                f"{sep!r}, got {int(seps[i]) + 1}: {body[i][:120]!r}"
            )
        keep = np.ones(len(body), dtype=bool)
        keep[blank] = False
        body = [line for line, k in zip(body, keep.tolist()) if k]
        numbers = numbers[keep]
    if not body:
        raise ValueError(f"{path}: the file holds no data rows")
    flat = sep.join(body).split(sep)
    return _Table(path, header, [flat[j::width] for j in range(width)], numbers)


def _split_table(path: Path, sep: str, header: Optional[List[str]]) -> _Table:
    return _split_lines(path, _read_text(path), sep, header)


def _read_csv_table(path: Path, delimiter: str) -> _Table:
    text = _read_text(path)
    if '"' not in text:  # no quoting: the fast splitter reads it the same way
        table = _split_lines(path, text, delimiter, None)
        table.header = [h.strip() for h in table.header]
        return table
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: the file is empty (a header row with column names is needed)")
    header = [h.strip() for h in header]
    rows: List[List[str]] = []
    numbers: List[int] = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{path}:{reader.line_num}: malformed row: expected {len(header)} fields "
                f"separated by {delimiter!r}, got {len(row)}: {delimiter.join(row)[:120]!r}"
            )
        rows.append(row)
        numbers.append(reader.line_num)
    if not rows:
        raise ValueError(f"{path}: the file holds no data rows")
    columns = [list(c) for c in zip(*rows)]
    return _Table(path, header, columns, np.asarray(numbers, dtype=np.int64))


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


def _canonical_ints(values: List[str]) -> Optional[np.ndarray]:
    """int64 values when every string is an integer written canonically ("7", not "07" or
    "+7"), so converting loses no distinction between ids; None otherwise."""
    ints = _ints(values)
    if ints is None:
        return None
    # A non-canonical spelling of a number is longer than the canonical one.
    digits = np.searchsorted(_POW10, np.abs(ints), side="right") + 1 + (ints < 0)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    return ints if np.array_equal(digits, lengths) else None


def _parse_ids(table: _Table, j: int, what: str) -> np.ndarray:
    """Raw ids: int64 when every value is a canonical integer, else the strings."""
    values = table.column(j)
    if "" in values:
        raise ValueError(f"{table.where(values.index(''))}: empty {what} id")
    ints = _canonical_ints(values)
    return ints if ints is not None else np.array(values)


def _parse_timestamps(table: _Table, j: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------- side tables
@dataclass
class _Side:
    """A side file (items or users): its ids and, per field, (kind, values, separator)."""

    table: _Table
    id_col: int
    fields: Dict[str, Tuple[str, int, str]]  # name -> (kind "token"/"token_seq", column, sep)
    default: Tuple[str, ...]


def _select_fields(side: Optional[_Side], fields: Fields, what: str) -> Dict[str, str]:
    """Map file field -> output name for the requested (or default) fields."""
    if fields is None:
        if side is None:
            return {}
        return {f: f for f in side.default}
    if isinstance(fields, str):
        fields = (fields,)
    mapping = dict(fields) if isinstance(fields, Mapping) else {f: f for f in fields}
    if not mapping:
        return {}
    if side is None:
        raise ValueError(
            f"{what}_fields={list(mapping)} were requested but there is no {what} file"
        )
    unknown = [f for f in mapping if f not in side.fields]
    if unknown:
        raise ValueError(
            f"{side.table.path}: no {what} field {unknown[0]!r}; its feature fields are "
            f"{sorted(side.fields)}"
        )
    return mapping


def _match_rows(side: _Side, raw_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(side row indices, 0-based positions in ``raw_ids``) of the side rows whose id is known."""
    keys = raw_ids.astype(str)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    ids = np.array(side.table.column(side.id_col))
    pos = np.searchsorted(sorted_keys, ids)
    pos_c = np.minimum(pos, len(sorted_keys) - 1)
    hit = (pos < len(sorted_keys)) & (sorted_keys[pos_c] == ids)
    rows = np.flatnonzero(hit)
    return rows, order[pos_c[hit]]


def _encode_tokens(values: np.ndarray) -> Tuple[np.ndarray, List[str]]:
    """Codes 1..C for the distinct values, in numeric order when all are integers."""
    ints = _canonical_ints(values.tolist())
    keys = values if ints is None else ints
    labels, inv = np.unique(keys, return_inverse=True)
    return inv.reshape(-1).astype(np.int64) + 1, [""] + [str(v) for v in labels]


def _feature(
    side: _Side, fname: str, out_name: str, rows: np.ndarray, dest: np.ndarray, size: int
) -> Tuple[np.ndarray, int, List[str]]:
    kind, col, sep = side.fields[fname]
    values = np.array(side.table.column(col), dtype=str)[rows]
    if kind == "token":
        codes = np.zeros(size, dtype=np.int64)
        present = values != ""
        vals = values[present]
        try:
            ages = vals.astype(np.int64) if "age" in (fname, out_name) else None
        except (ValueError, OverflowError):
            ages = None
        if ages is not None:
            codes[dest[present]] = np.searchsorted(_AGE_EDGES, ages, side="right") + 1
            return codes, len(AGE_BUCKETS) + 1, [""] + list(AGE_BUCKETS)
        enc, labels = _encode_tokens(vals)
        codes[dest[present]] = enc
        return codes, len(labels), labels
    pieces = [[p for p in v.split(sep) if p] for v in values.tolist()]
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    width = max(1, int(lens.max()) if len(lens) else 1)
    codes = np.zeros((size, width), dtype=np.int64)
    flat = np.array([p for ps in pieces for p in ps], dtype=str)
    if len(flat) == 0:
        return codes, 1, [""]
    enc, labels = _encode_tokens(flat)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    codes[np.repeat(dest, lens), np.arange(len(flat)) - starts] = enc
    return codes, len(labels), labels


def _features(
    side: Optional[_Side], fields: Fields, what: str, raw_ids: np.ndarray, offset: int
) -> Tuple[Dict[str, np.ndarray], Dict[str, int], Dict[str, List[str]]]:
    mapping = _select_fields(side, fields, what)
    feats: Dict[str, np.ndarray] = {}
    vocab: Dict[str, int] = {}
    labels: Dict[str, List[str]] = {}
    if not mapping:
        return feats, vocab, labels
    assert side is not None
    rows, pos = _match_rows(side, raw_ids)
    size = len(raw_ids) + offset
    for fname, out in mapping.items():
        feats[out], vocab[out], labels[out] = _feature(side, fname, out, rows, pos + offset, size)
    return feats, vocab, labels


# ---------------------------------------------------------------------------- formats
@dataclass
class _Raw:
    name: str
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    item_side: Optional[_Side] = None
    user_side: Optional[_Side] = None


def _find_column(table: _Table, wanted: Optional[str], role: str, names: Sequence[str]) -> int:
    lowered = [h.lower() for h in table.header]
    candidates = [wanted] if wanted is not None else list(names)
    for c in candidates:
        if c.lower() in lowered:
            return lowered.index(c.lower())
    hint = f"{role}_col={wanted!r}" if wanted is not None else f"one of {list(names)}"
    raise ValueError(
        f"{table.path}: no {role} column ({hint}); the header has {table.header}. "
        f"Pass {role}_col= to name it"
    )


def _find_columns(table: _Table, cols: Sequence[Optional[str]],
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


def _read_atomic_table(path: Path) -> Tuple[_Table, List[str]]:
    """The rows of a RecBole atomic file; the header becomes the field names, and their types."""
    table = _split_table(path, "\t", None)
    names, kinds = [], []
    for tok in table.header:
        name, colon, kind = tok.strip().partition(":")
        if not colon or not name:
            raise ValueError(f"{path}:1: header field {tok!r} is not of the form 'name:type'")
        names.append(name)
        kinds.append(kind)
    table.header = names
    return table, kinds


def _read_atomic_side(path: Path, id_field: str) -> _Side:
    table, kinds = _read_atomic_table(path)
    if id_field not in table.header:
        raise ValueError(f"{path}: no {id_field!r} field; the header has {table.header}")
    id_col = table.header.index(id_field)
    fields = {
        n: (k, j, " ")
        for j, (n, k) in enumerate(zip(table.header, kinds))
        if j != id_col and k in ("token", "token_seq")
    }
    return _Side(table, id_col, fields, tuple(fields))


def _read_atomic(path: Path, user_col, item_col, time_col) -> _Raw:
    table, _ = _read_atomic_table(path)
    u, i, t = _find_columns(table, (user_col, item_col, time_col),
                            (("user_id", "user"), ("item_id", "item"), ("timestamp", "time")))  # fmt: skip
    users, items = _parse_ids(table, u, "user"), _parse_ids(table, i, "item")
    raw = _Raw(path.stem, users, items, _parse_timestamps(table, t))
    item_path, user_path = path.with_suffix(".item"), path.with_suffix(".user")
    if item_path.is_file():
        raw.item_side = _read_atomic_side(item_path, table.header[i])
    if user_path.is_file():
        raw.user_side = _read_atomic_side(user_path, table.header[u])
    return raw


def _read_ml1m(path: Path) -> _Raw:
    table = _split_table(path, "::", ["user", "item", "rating", "timestamp"])
    name = path.parent.name or path.stem
    raw = _Raw(
        name,
        _parse_ids(table, 0, "user"),
        _parse_ids(table, 1, "item"),
        _parse_timestamps(table, 3),
    )
    movies, users = path.parent / "movies.dat", path.parent / "users.dat"
    if movies.is_file():
        t = _split_table(movies, "::", ["item", "title", "genre"])
        raw.item_side = _Side(t, 0, {"genre": ("token_seq", 2, "|")}, ("genre",))
    if users.is_file():
        t = _split_table(users, "::", ["user", "gender", "age", "occupation", "zip_code"])
        fields = {n: ("token", j, "") for j, n in enumerate(t.header) if j > 0}
        raw.user_side = _Side(t, 0, fields, ("gender", "age", "occupation"))
    return raw


def _read_csv(path: Path, delimiter: Optional[str], user_col, item_col, time_col) -> _Raw:
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    table = _read_csv_table(path, delimiter)
    u, i, t = _find_columns(table, (user_col, item_col, time_col),
                            [_COLUMN_NAMES[r] for r in ("user", "item", "timestamp")])  # fmt: skip
    for j in (u, i, t):
        table.columns[j] = [v.strip() for v in table.columns[j]]
    return _Raw(
        path.stem,
        _parse_ids(table, u, "user"),
        _parse_ids(table, i, "item"),
        _parse_timestamps(table, t),
    )


def _resolve(path: Path, fmt: Optional[str]) -> Tuple[Path, str]:
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


# ---------------------------------------------------------------------------- load
def load(
    source: PathLike,
    *,
    min_events: int = 3,
    download: bool = True,
    format: Optional[str] = None,
    item_fields: Fields = None,
    user_fields: Fields = None,
    user_col: Optional[str] = None,
    item_col: Optional[str] = None,
    time_col: Optional[str] = None,
    delimiter: Optional[str] = None,
) -> Dataset:
    """Load a named data set (``"ml-100k"``) or a file / folder (see the module docstring).

    Args:
        source: a name in :data:`KNOWN_DATASETS`, or a path (a name with a path separator, such as
            ``./ml-100k``, is read as a path).
        min_events: users with fewer events are dropped (their count is logged on the
            ``"spnn_fast"`` logger and kept in ``Dataset.dropped_users``).
        download: fetch a named data set that is not cached (see :func:`fetch`).
        format: ``"atomic"``, ``"ml-1m"`` or ``"csv"``; ``None`` tells it from the file name.
        item_fields / user_fields: the side-file fields to encode, a list or a mapping
            ``{file field: feature name}``. ``None``: ml-100k ``{"class": "genre"}`` and
            ``("age", "gender", "occupation")``; ml-1m ``("genre",)`` and the same three; atomic
            files every ``token`` / ``token_seq`` field.
        user_col / item_col / time_col: column names in a CSV or ``.inter`` file.
        delimiter: CSV delimiter (default ``","``, tab for ``.tsv``).
    """
    if not isinstance(min_events, (int, np.integer)) or isinstance(min_events, bool):
        raise TypeError(f"min_events must be an int, got {type(min_events).__name__}")
    if min_events < 1:
        raise ValueError(f"min_events must be >= 1, got {min_events}")
    for name, value in (("user_col", user_col), ("item_col", item_col), ("time_col", time_col),
                        ("delimiter", delimiter), ("format", format)):  # fmt: skip
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    text = os.fspath(source)
    named = text in KNOWN_DATASETS and os.sep not in text and "/" not in text
    if named:
        folder = fetch(text, download=download)
        raw = _read_atomic(folder / f"{text}.inter", user_col, item_col, time_col)
        raw.name = text
        _check_counts(raw, folder)
        default_items, default_users = _NAMED_FIELDS[text]
        item_fields = default_items if item_fields is None else item_fields
        user_fields = default_users if user_fields is None else user_fields
    else:
        path = Path(text).expanduser()
        if not path.exists() and os.sep not in text and "/" not in text and not path.suffix:
            raise ValueError(
                f"unknown dataset name {text!r}; known names: {sorted(KNOWN_DATASETS)}. Or pass "
                f"the path of a RecBole .inter file, a MovieLens-1M ratings.dat or a CSV file"
            )
        file, fmt = _resolve(path, format)
        if fmt == "atomic":
            raw = _read_atomic(file, user_col, item_col, time_col)
        elif fmt == "ml-1m":
            raw = _read_ml1m(file)
        else:
            raw = _read_csv(file, delimiter, user_col, item_col, time_col)
    return _build(raw, min_events, item_fields, user_fields)


def _check_counts(raw: _Raw, folder: Path) -> None:
    got = (len(raw.users), len(np.unique(raw.users)), len(np.unique(raw.items)))
    if got != _ML100K_COUNTS:
        raise ValueError(
            f"{folder}: the ml-100k files hold (events, users, items) = {got}, expected "
            f"{_ML100K_COUNTS}; delete the folder to fetch the files again"
        )


def _build(raw: _Raw, min_events: int, item_fields: Fields, user_fields: Fields) -> Dataset:
    _, inv, counts = np.unique(raw.users, return_inverse=True, return_counts=True)
    keep = counts[inv.reshape(-1)] >= min_events
    dropped = int((counts < min_events).sum())
    if dropped:
        logger.warning(
            "%s: dropped %d of %d users with fewer than %d events (%d events)",
            raw.name,
            dropped,
            len(counts),
            min_events,
            int((~keep).sum()),
        )
    if not keep.any():
        raise ValueError(f"{raw.name}: no user has at least min_events={min_events} events")
    log = InteractionLog(raw.users[keep], raw.items[keep], raw.timestamps[keep])
    item_feats, item_vocab, item_labels = _features(
        raw.item_side, item_fields, "item", log.item_ids, 1
    )
    user_feats, user_vocab, user_labels = _features(
        raw.user_side, user_fields, "user", log.user_ids, 0
    )
    clash = sorted(set(item_feats) & set(user_feats))
    if clash:
        raise ValueError(
            f"item and user features share the names {clash}; rename one with a mapping, "
            f"e.g. user_fields={{{clash[0]!r}: 'user_{clash[0]}'}}"
        )
    return Dataset(
        name=raw.name,
        log=log,
        item_features=item_feats,
        user_features=user_feats,
        feature_vocab={**item_vocab, **user_vocab},
        dropped_users=dropped,
        feature_labels={**item_labels, **user_labels},
    )
