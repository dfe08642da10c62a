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
* ``"parquet"``: a ``.parquet`` file (or a folder holding one) with the columns of a CSV file,
  found by the same names and keywords; ids are integers or strings, timestamps integers, whole
  floats, strings or Parquet timestamps. Needs pyarrow (``pip install 'spnn_fast[arrow]'``).

Event files are read columnar by pyarrow where it is installed, into integer arrays: under 100
bytes per event at the peak (a 5M-event CSV), the log included. Without pyarrow, the text
formats are read by Python's csv module (about 540 bytes per event); both readers give the
same logs and the same errors.

Timestamps become int64 seconds exactly: integers as written, floats only when finite, whole and
below 2**53; anything else is an error naming the file and line. They are times since 1970 in
seconds unless ``time_unit=`` says otherwise: values of 1e11 or more look like milliseconds,
microseconds or nanoseconds and are refused, naming the unit to pass (``time_unit="ms"``
orders the events by milliseconds and keeps whole seconds). They must be times, not time-gap
buckets computed elsewhere: small integers cannot be told from seconds, and the buckets are
computed from the gaps between timestamps. Raw ids that are all canonical
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

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from spnn_fast._formats import (
    Raw,
    Side,
    read_atomic,
    read_csv,
    read_ml1m,
    read_parquet,
    resolve,
)
from spnn_fast._tables import canonical_ints
from spnn_fast.download import (
    KNOWN_DATASETS,
    DatasetUnavailableError,
    check_counts,
    fetch,
    is_dataset_name,
)
from spnn_fast.log import InteractionLog, seconds_divisor

__all__ = [
    "AGE_BUCKETS",
    "KNOWN_DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "fetch",
    "load",
    "multi_hot",
]

logger = logging.getLogger("spnn_fast")

PathLike = Union[str, os.PathLike]
Fields = Optional[Union[Sequence[str], Mapping[str, str]]]

AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56], dtype=np.int64)
_NAMED_FIELDS = {
    "ml-100k": ({"class": "genre"}, ("age", "gender", "occupation")),
}


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


# ---------------------------------------------------------------------------- side tables
def _select_fields(side: Optional[Side], fields: Fields, what: str) -> Dict[str, str]:
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


def _match_rows(side: Side, raw_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
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
    ints = canonical_ints(values.tolist())
    keys = values if ints is None else ints
    labels, inv = np.unique(keys, return_inverse=True)
    return inv.reshape(-1).astype(np.int64) + 1, [""] + [str(v) for v in labels]


def _feature(
    side: Side, fname: str, out_name: str, rows: np.ndarray, dest: np.ndarray, size: int
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
    side: Optional[Side], fields: Fields, what: str, raw_ids: np.ndarray, offset: int
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
    time_unit: Optional[str] = None,
) -> Dataset:
    """Load a named data set (``"ml-100k"``) or a file / folder (see the module docstring).

    Args:
        source: a name in :data:`KNOWN_DATASETS`, or a path (a name with a path separator, such as
            ``./ml-100k``, is read as a path).
        min_events: users with fewer events are dropped (their count is logged on the
            ``"spnn_fast"`` logger and kept in ``Dataset.dropped_users``).
        download: fetch a named data set that is not cached (see :func:`fetch`).
        format: ``"atomic"``, ``"ml-1m"``, ``"csv"`` or ``"parquet"``; ``None`` tells it from
            the file name.
        item_fields / user_fields: the side-file fields to encode, a list or a mapping
            ``{file field: feature name}``. ``None``: ml-100k ``{"class": "genre"}`` and
            ``("age", "gender", "occupation")``; ml-1m ``("genre",)`` and the same three; atomic
            files every ``token`` / ``token_seq`` field.
        user_col / item_col / time_col: column names in a CSV, Parquet or ``.inter`` file.
        delimiter: CSV delimiter (default ``","``, tab for ``.tsv``).
        time_unit: the unit of the timestamps since 1970: ``None`` (default) seconds, refused
            with a ValueError when they look like a finer unit (1e11 or more: milliseconds,
            microseconds, nanoseconds); ``"ms"``, ``"us"``, ``"ns"`` order events by the
            given values and floor them to seconds; ``"s"`` seconds, unchecked. A Parquet
            timestamp column gives its own unit.
    """
    if not isinstance(min_events, (int, np.integer)) or isinstance(min_events, bool):
        raise TypeError(f"min_events must be an int, got {type(min_events).__name__}")
    if min_events < 1:
        raise ValueError(f"min_events must be >= 1, got {min_events}")
    for name, value in (("user_col", user_col), ("item_col", item_col), ("time_col", time_col),
                        ("delimiter", delimiter), ("format", format)):  # fmt: skip
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    seconds_divisor(np.zeros(0, dtype=np.int64), time_unit)  # a bad time_unit, before reading
    text = os.fspath(source)
    named = is_dataset_name(text)
    if named:
        folder = fetch(text, download=download)
        raw = read_atomic(folder / f"{text}.inter", user_col, item_col, time_col)
        raw.name = text
        check_counts(folder, (len(raw.timestamps), len(raw.users.values), len(raw.items.values)))
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
        file, fmt = resolve(path, format)
        if fmt == "atomic":
            raw = read_atomic(file, user_col, item_col, time_col)
        elif fmt == "ml-1m":
            raw = read_ml1m(file)
        elif fmt == "parquet":
            raw = read_parquet(file, user_col, item_col, time_col)
        else:
            raw = read_csv(file, delimiter, user_col, item_col, time_col)
    return _build(raw, min_events, item_fields, user_fields, time_unit)


def _divisor(raw: Raw, time_unit: Optional[str]) -> int:
    """How many of the file's timestamp unit make a second (see :func:`load`'s time_unit)."""
    unit = time_unit
    if raw.time_unit is not None:  # a Parquet timestamp column
        if time_unit not in (None, raw.time_unit):
            names = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
                     "ns": "nanoseconds"}  # fmt: skip
            raise ValueError(f"{raw.path}: the timestamp column holds {names[raw.time_unit]} "
                             f"(its Parquet type says so); time_unit={time_unit!r} disagrees")  # fmt: skip
        unit = raw.time_unit
    return seconds_divisor(raw.timestamps, unit, f"{raw.path}: the timestamps", "load")


def _build(raw: Raw, min_events: int, item_fields: Fields, user_fields: Fields,
           time_unit: Optional[str] = None) -> Dataset:  # fmt: skip
    divisor = _divisor(raw, time_unit)
    counts = np.bincount(raw.users.codes, minlength=len(raw.users.values))
    keep = counts[raw.users.codes] >= min_events
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
    # Leave-one-out keeps a user's last two events for validation and test; the next-item
    # targets of training are the events in between, of which a user with 3 events has none.
    untrained = int(((counts >= min_events) & (counts <= 3)).sum())
    if untrained:
        logger.warning(
            "%s: %d of %d users have 3 or fewer events, so no training target: leave-one-out "
            "keeps their last two events for validation and test (they are evaluated, never "
            "trained on; min_events=4 drops them)",
            raw.name,
            untrained,
            len(counts) - dropped,
        )
    users, items, ts = raw.users, raw.items, raw.timestamps
    if dropped:
        users, items, ts = users.subset(keep), items.subset(keep), ts[keep]
    log = InteractionLog._from_codes(users.codes, users.values, items.codes, items.values, ts,
                                     divisor)  # fmt: skip
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
