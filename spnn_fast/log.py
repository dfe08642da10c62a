"""InteractionLog: a user-grouped, time-sorted interaction log in CSR form.

Events of user ``u`` (0..U-1) are ``items[offsets[u]:offsets[u+1]]`` with their ``timestamps``,
sorted by time (ties keep input order). Items are remapped to 1..V (0 is padding), users to
0..U-1; ``item_ids[k - 1]`` and ``user_ids[u]`` give the raw ids back. Saved as plain ``.npy``
files that load memory-mapped, so a log larger than memory still feeds ``encode_batch``.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Optional, Union

import numpy as np
import torch

from spnn_fast._io import DamagedFileError, atomic_write, read_json

__all__ = ["TIME_UNITS", "InteractionLog", "seconds_divisor"]

_ARRAYS = ("offsets", "items", "timestamps", "user_ids", "item_ids")
_FORMAT = "spnn_fast.InteractionLog/1"
_AGAIN = "save the log again"

ArrayLike = Union[np.ndarray, torch.Tensor, list, tuple]

# Units of timestamps since 1970 and how many of each make a second.
TIME_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
_UNIT_NAMES = {"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
# Seconds since 1970 stay below 1e10 until the year 2286; 1e11 seconds is the year 5138, while
# 1e11 milliseconds is 1973, so larger values are taken for a finer unit.
_SECONDS_BELOW = 10**11


def seconds_divisor(ts: np.ndarray, time_unit: Optional[str], what: str = "timestamps",
                    call: str = "InteractionLog") -> int:  # fmt: skip
    """How many ``time_unit`` make a second. ``None`` means seconds, checked: timestamps too
    large to be seconds since 1970 (milliseconds, microseconds or nanoseconds: time buckets
    would all saturate) are a ValueError naming the unit they look like. ``"s"`` means seconds,
    unchecked."""
    if time_unit is not None and not isinstance(time_unit, str):
        raise TypeError(f"time_unit must be a str or None, got {type(time_unit).__name__}")
    if time_unit is not None:
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit={time_unit!r} is not one of {list(TIME_UNITS)} (or "
                             f"None: seconds, refused when they look like a finer unit)")  # fmt: skip
        return TIME_UNITS[time_unit]
    big = max(abs(int(ts.min())), abs(int(ts.max()))) if len(ts) else 0
    if big >= _SECONDS_BELOW:
        guess = "ms" if big < 10**14 else "us" if big < 10**17 else "ns"
        raise ValueError(
            f"{what} look like {_UNIT_NAMES[guess]} since 1970, not seconds (the largest "
            f"magnitude is {big}; seconds stay below 1e10 until the year 2286, and time buckets "
            f"count seconds): pass {call}(..., time_unit={guess!r}) to convert them, or "
            f"time_unit='s' if they are seconds"
        )
    return 1


def _as_numpy(name: str, x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {x.device}")
        x = x.detach().numpy()
    if isinstance(x, (list, tuple)) and len({isinstance(v, (str, bytes)) for v in x}) == 2:
        # numpy writes [1, "1"] as the strings ["1", "1"]: read it as the object array it is,
        # whose ids are checked one by one.
        x = np.array(x, dtype=object)
    x = np.asarray(x)
    if x.size == 0 and x.dtype.kind == "f":  # np.asarray([]) is float64: an empty log
        x = x.astype(np.int64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x


def _raw_ids(name: str, x: np.ndarray) -> np.ndarray:
    """Raw ids as a dtype that .npy stores without pickle (integers or fixed-width strings)."""
    if x.dtype == np.uint64:  # int64 would wrap ids >= 2**63
        return x
    if x.dtype.kind in "iub":
        return x.astype(np.int64, copy=False)
    if x.dtype.kind in "US":
        return x
    if x.dtype.kind == "O":
        ints = [isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x]
        for v, i in zip(x, ints):
            if not (i or isinstance(v, str)):
                raise TypeError(f"{name} must hold integer or string ids, got {v!r}")
        if all(ints):
            vals = [int(v) for v in x]
            lo, hi = (min(vals), max(vals)) if vals else (0, 0)
            if -(2**63) <= lo and hi < 2**63:
                return np.array(vals, dtype=np.int64)
            if 0 <= lo and hi < 2**64:
                return np.array(vals, dtype=np.uint64)
            raise ValueError(f"{name} holds integer ids outside 64 bits ({lo} .. {hi})")
        # Integers and strings together: kept as text, unless two ids would become one (1, "1").
        first: dict = {}
        for v in x:
            w = first.setdefault(str(v), v)
            if w != v:
                raise ValueError(
                    f"{name} holds the ids {w!r} and {v!r}, one id once written as text"
                )
        return x.astype(str)
    raise TypeError(f"{name} must hold integer or string ids, got dtype {x.dtype}")


def _int64_seconds(ts: np.ndarray) -> np.ndarray:
    """Timestamps as int64 seconds: integers as given, floats only when every value is integral
    (RecBole's ``timestamp:float`` columns hold such values) and fits int64."""
    if ts.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(ts) | (ts != np.floor(ts)) | (np.abs(ts) >= 2.0**63)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"timestamps[{i}]={float(ts[i])!r} is not a whole number of seconds that fits int64 "
                f"(float timestamps must be finite and integral)"
            )
        return ts.astype(np.int64)
    if ts.dtype.kind not in "iu":
        raise TypeError(f"timestamps must be integers (seconds), got dtype {ts.dtype}")
    if ts.dtype == np.uint64 and len(ts) and ts.max() >= 2**63:  # int64 would wrap them
        i = int(np.argmax(ts >= 2**63))
        raise ValueError(f"timestamps[{i}]={int(ts[i])} does not fit int64 seconds")
    return ts.astype(np.int64, copy=False)


def _csr(user_idx: np.ndarray, num_users: int, item_idx: np.ndarray, ts: np.ndarray,
         divisor: int = 1):  # fmt: skip
    """(offsets, items 1..V, timestamps) of events grouped by user and sorted by time; the
    timestamps are ordered as given, then divided by ``divisor`` (floored) into seconds."""
    order = _order(user_idx, num_users, ts)
    counts = np.bincount(user_idx, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    seconds = ts[order] if divisor == 1 else ts[order] // divisor
    return offsets, item_idx[order].astype(np.int64) + 1, seconds


def _order(user_idx: np.ndarray, num_users: int, ts: np.ndarray) -> np.ndarray:
    """The events in order of (user, time), ties in input order (stable sorts)."""
    if len(ts) < 2 or (ts[1:] >= ts[:-1]).all():  # a log in time order: by user alone
        return _stable_by(user_idx, num_users)
    lo, hi = int(ts.min()), int(ts.max())
    span_bits = (hi - lo).bit_length()
    if span_bits + max(num_users - 1, 0).bit_length() <= 62:  # one sort of a packed key
        return np.argsort((user_idx.astype(np.int64) << span_bits) | (ts - lo), kind="stable")
    order = np.argsort(ts, kind="stable")
    return order[_stable_by(user_idx[order], num_users)]


def _stable_by(keys: np.ndarray, n: int) -> np.ndarray:
    """A stable argsort of integer keys in [0, n): numpy radix-sorts 16-bit keys, so keys
    below 2**32 are sorted in two 16-bit passes, low half first."""
    if n <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if n <= 1 << 32:
        low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
        return low[np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")]
    return np.argsort(keys, kind="stable")


class InteractionLog:
    """Interactions grouped by user and sorted by time, with items remapped to 1..V.

    Build it from three equal-length arrays of raw ``users``, ``items`` (ids of any integer or
    string type) and ``timestamps``: integers, or floats whose values are all integral (the
    first that is not is named in the error). Timestamps are times, not gap buckets (which
    are computed from them), in seconds unless ``time_unit`` says otherwise:

    * ``None`` (default): seconds; values of 1e11 or more (after the year 5138 in seconds, but
      milliseconds, microseconds or nanoseconds since 1970) are a ValueError saying which unit
      they look like.
    * ``"ms"``, ``"us"``, ``"ns"``: events are ordered by the given values, which are then
      floored to whole seconds.
    * ``"s"``: seconds, unchecked.
    """

    def __init__(self, users: ArrayLike, items: ArrayLike, timestamps: ArrayLike, *,
                 time_unit: Optional[str] = None):  # fmt: skip
        users = _raw_ids("users", _as_numpy("users", users))
        items = _raw_ids("items", _as_numpy("items", items))
        ts = _as_numpy("timestamps", timestamps)
        if not (len(users) == len(items) == len(ts)):
            raise ValueError(
                f"users, items and timestamps must have equal lengths, got "
                f"{len(users)}, {len(items)} and {len(ts)}"
            )
        ts = _int64_seconds(ts)
        divisor = seconds_divisor(ts, time_unit)
        user_ids, user_idx = np.unique(users, return_inverse=True)
        item_ids, item_idx = np.unique(items, return_inverse=True)
        self._set(*_csr(user_idx.reshape(-1), len(user_ids), item_idx.reshape(-1), ts, divisor),
                  user_ids, item_ids)  # fmt: skip

    @classmethod
    def _from_codes(cls, user_idx: np.ndarray, user_ids: np.ndarray, item_idx: np.ndarray,
                    item_ids: np.ndarray, timestamps: np.ndarray,
                    divisor: int = 1) -> InteractionLog:  # fmt: skip
        """The log of factorized ids (``user_ids[user_idx[k]]`` is event k's user, ids sorted
        and distinct as ``np.unique`` gives them): the constructor without its ``np.unique``;
        ``divisor`` as :func:`seconds_divisor` gives it."""
        log = cls.__new__(cls)
        log._set(*_csr(user_idx, len(user_ids), item_idx, timestamps, divisor), user_ids,
                 item_ids)  # fmt: skip
        return log

    def _set(self, offsets, items, timestamps, user_ids, item_ids) -> None:
        self.offsets = offsets
        self.items = items
        self.timestamps = timestamps
        self.user_ids = user_ids
        self.item_ids = item_ids

    @classmethod
    def from_csr(
        cls,
        offsets: np.ndarray,
        items: np.ndarray,
        timestamps: np.ndarray,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        *,
        validate: bool = True,
    ) -> InteractionLog:
        """Wrap CSR arrays that already follow the layout (no copy; CPU tensors are viewed)."""
        arrays = [a if isinstance(a, np.ndarray) else _as_numpy(n, a)
                  for n, a in zip(_ARRAYS, (offsets, items, timestamps, user_ids, item_ids))]  # fmt: skip
        log = cls.__new__(cls)
        log._set(*arrays)
        if validate:
            log.validate()
        return log

    # ------------------------------------------------------------------ properties
    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """V: item ids run over 1..V."""
        return len(self.item_ids)

    @property
    def num_events(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        """Events per user, int64 [U]."""
        return np.diff(self.offsets)

    def user_events(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, timestamps) of user ``u`` in time order."""
        if not isinstance(u, numbers.Integral) or isinstance(u, bool):
            raise TypeError(f"u must be an integer user index, got {type(u).__name__}")
        if not 0 <= u < self.num_users:
            raise ValueError(f"u={u} is outside [0, {self.num_users})")
        s, e = int(self.offsets[u]), int(self.offsets[u + 1])
        return self.items[s:e], self.timestamps[s:e]

    def __len__(self) -> int:
        return self.num_events

    def __repr__(self) -> str:
        return (
            f"InteractionLog(users={self.num_users}, items={self.num_items}, "
            f"events={self.num_events})"
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check the CSR invariants over the whole log; ValueError names the first violation."""
        off, items, ts = self.offsets, self.items, self.timestamps
        for name, a in (("offsets", off), ("items", items), ("timestamps", ts)):
            if a.dtype.kind not in "iu":
                raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
        for name, a in (("items", items), ("timestamps", ts)):
            if a.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if off.ndim != 1 or len(off) < 1:
            raise ValueError(f"offsets must be 1-D with at least one entry, got shape {off.shape}")
        if off[0] != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(off[0])}")
        if off[-1] != len(items):
            raise ValueError(f"offsets[-1]={int(off[-1])} must equal len(items)={len(items)}")
        if len(ts) != len(items):
            raise ValueError(f"timestamps has {len(ts)} entries, items has {len(items)}")
        bad = np.flatnonzero(off[1:] < off[:-1])  # no np.diff: it wraps on unsigned
        if len(bad):
            i = int(bad[0]) + 1
            raise ValueError(f"offsets decrease at index {i}: {int(off[i])} < {int(off[i - 1])}")
        if len(self.user_ids) != self.num_users:
            raise ValueError(
                f"user_ids has {len(self.user_ids)} entries for {self.num_users} users (offsets)"
            )
        bad = np.flatnonzero((items < 1) | (items > self.num_items))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"items[{i}]={int(items[i])} is outside [1, {self.num_items}]")
        starts = np.zeros(len(items), dtype=bool)
        starts[off[:-1][off[:-1] < len(items)]] = True
        bad = np.flatnonzero((ts[1:] < ts[:-1]) & ~starts[1:])
        if len(bad):
            i = int(bad[0]) + 1
            raise ValueError(
                f"timestamps decrease within a user at index {i}: {int(ts[i])} < {int(ts[i - 1])}"
            )

    # ------------------------------------------------------------------ storage
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the log as ``.npy`` files (plus ``meta.json``) into the folder ``path``."""
        os.makedirs(path, exist_ok=True)
        for name in _ARRAYS:
            array = np.ascontiguousarray(getattr(self, name))
            atomic_write(os.path.join(path, f"{name}.npy"),
                         lambda f, a=array: np.save(f, a, allow_pickle=False))  # fmt: skip
        meta = {
            "format": _FORMAT,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_events": self.num_events,
        }
        # Written last: a folder without meta.json is not a saved log.
        atomic_write(os.path.join(path, "meta.json"), lambda f: json.dump(meta, f), text=True)

    @classmethod
    def load(
        cls, path: Union[str, os.PathLike], *, mmap: bool = True, validate: bool = False
    ) -> InteractionLog:
        """Read a log written by :meth:`save`; with ``mmap`` the arrays stay on disk.

        ``validate=True`` checks the whole log (reads every page). Without it only the sizes are
        checked: ``encode_batch`` validates every event it reads anyway.
        """
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} holds no saved InteractionLog (no meta.json)")
        meta = read_json(meta_path, ("format", "num_users", "num_items", "num_events"), _AGAIN)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
        mode = "r" if mmap else None
        arrays = [_load_array(os.path.join(path, f"{n}.npy"), mode) for n in _ARRAYS]
        log = cls.from_csr(*arrays, validate=validate)
        if (log.num_users, log.num_items, log.num_events) != (
            meta["num_users"],
            meta["num_items"],
            meta["num_events"],
        ):
            raise ValueError(f"{path}: arrays do not match meta.json sizes {meta}")
        if log.offsets[0] != 0 or log.offsets[-1] != log.num_events:
            raise ValueError(f"{path}: offsets do not span the {log.num_events} events")
        return log


def _load_array(path: str, mode: Optional[str]) -> np.ndarray:
    """A ``.npy`` array of a saved log, never unpickled; a damaged file is named."""
    try:
        return np.load(path, mmap_mode=mode, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the saved log lacks it; {_AGAIN}") from None
    except (PermissionError, IsADirectoryError):
        raise
    except Exception:  # numpy raises many types for a damaged file (and suggests pickle)
        raise DamagedFileError(f"{path} is damaged: {_npy_trouble(path)}; {_AGAIN}") from None


def _npy_trouble(path: str) -> str:
    """What is wrong with a ``.npy`` file that numpy does not load without pickle."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            return "it is empty" if f.tell() == 0 else "it is not a .npy array file"
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                read = np.lib.format.read_array_header_2_0
            dtype = read(f)[2]
        except Exception:  # the header itself is damaged
            return "it is cut short or not a .npy array the log wrote"
    if dtype.hasobject:
        return "it is not a .npy array of numbers or text (it holds Python objects)"
    return "it is cut short or not a .npy array the log wrote"
