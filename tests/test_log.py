"""InteractionLog: grouping, stable time order, id maps, validation, memory-mapped round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from spnn_fast import InteractionLog, _ext
from spnn_fast.encode import encode_batch


def _events(log: InteractionLog, u: int) -> list[tuple]:
    """User u's events as (raw item id, timestamp) pairs in log order."""
    items, times = log.user_events(u)
    return [(log.item_ids[i - 1].item(), int(t)) for i, t in zip(items, times)]


def test_hand_case():
    users = [20, 10, 20, 30, 10, 20]
    items = [7, 5, 5, 9, 7, 8]
    times = [50, 40, 10, 5, 30, 20]
    log = InteractionLog(users, items, times)
    assert log.user_ids.tolist() == [10, 20, 30] and log.item_ids.tolist() == [5, 7, 8, 9]
    assert (log.num_users, log.num_items, log.num_events, len(log)) == (3, 4, 6, 6)
    assert log.offsets.tolist() == [0, 2, 5, 6]
    assert log.lengths.tolist() == [2, 3, 1]
    assert log.items.tolist() == [2, 1, 1, 3, 2, 4]  # 7 5 | 5 8 7 | 9 remapped to 1..4
    assert log.timestamps.tolist() == [30, 40, 10, 20, 50, 5]
    assert _events(log, 1) == [(5, 10), (8, 20), (7, 50)]
    for a in (log.offsets, log.items, log.timestamps):
        assert a.dtype == np.int64
    assert repr(log) == "InteractionLog(users=3, items=4, events=6)"
    log.validate()
    with pytest.raises(ValueError, match=r"u=3 is outside \[0, 3\)"):
        log.user_events(3)
    for u in (0.5, True):
        with pytest.raises(TypeError, match="u must be an integer user index"):
            log.user_events(u)
    assert _events(log, np.int64(0)) == _events(log, 0)


def test_ties_keep_input_order():
    # Equal timestamps within a user keep their input order (a stable sort), whatever the
    # interleaving with other users and with earlier/later events.
    users = np.array([1, 0, 1, 1, 0, 1, 1])
    items = np.array([10, 11, 12, 13, 14, 15, 16])
    times = np.array([5, 3, 5, 1, 3, 5, 9])
    log = InteractionLog(users, items, times)
    assert _events(log, 0) == [(11, 3), (14, 3)]
    assert _events(log, 1) == [(13, 1), (10, 5), (12, 5), (15, 5), (16, 9)]


@pytest.mark.parametrize("times", ["narrow", "wide", "in order", "many users"])
def test_random_log_matches_a_python_sort(times):
    # Each takes another sort: narrow, (user, time) packed into one key; wide, times too far
    # apart to pack; in order, a log sorted by time sorted by user alone; many users, in
    # order, users sorted in two 16-bit passes.
    rng = np.random.default_rng(0)
    n = 2000
    users = rng.integers(0, 40, n) * 7 - 100
    items = rng.integers(0, 300, n) + 10**12
    if times == "many users":
        users = np.arange(70_000)
        users = np.concatenate([users, rng.choice(users, n)])
        items = rng.integers(0, 300, len(users))
    times = {"narrow": lambda: rng.integers(0, 50, len(users)),  # many ties
             "wide": lambda: np.array([-(2**62), -5, 0, 7, 2**62])[rng.integers(0, 5, n)],
             "in order": lambda: np.sort(rng.integers(0, 50, n)),
             "many users": lambda: np.sort(rng.integers(0, 50, len(users)))}[times]()  # fmt: skip
    log = InteractionLog(users, items, times, time_unit="s")
    log.validate()
    want = sorted(range(len(users)), key=lambda k: (users[k], times[k], k))
    got = zip(np.repeat(log.user_ids, log.lengths), log.item_ids[log.items - 1], log.timestamps)
    assert [tuple(map(int, e)) for e in got] == [(users[k], items[k], times[k]) for k in want]


def test_string_and_other_ids():
    log = InteractionLog(["bob", "amy", "bob"], np.array(["x", "y", "x"]), np.array([2, 1, 1]))
    assert log.user_ids.tolist() == ["amy", "bob"] and log.item_ids.tolist() == ["x", "y"]
    assert _events(log, 1) == [("x", 1), ("x", 2)]
    log = InteractionLog(np.array(["a", 3], dtype=object), [1, 1], [0, 0])  # mixed: as strings
    assert log.user_ids.tolist() == ["3", "a"]
    with pytest.raises(ValueError, match=r"users holds the ids 1 and '1', one id once written"):
        InteractionLog(np.array([1, "1"], dtype=object), [1, 1], [0, 0])
    with pytest.raises(TypeError, match=r"items must hold integer or string ids, got None"):
        InteractionLog([1, 1], np.array([1, None], dtype=object), [0, 0])
    log = InteractionLog(np.array([5, 2**63], dtype=object), [1, 1], [0, 0])  # Python ints
    assert log.user_ids.dtype == np.uint64 and log.user_ids.tolist() == [5, 2**63]
    big = np.array([2**64 - 1, 2**63], dtype=np.uint64)  # would wrap as int64
    log = InteractionLog(big, big, torch.tensor([1, 2]))
    assert log.user_ids.tolist() == [2**63, 2**64 - 1]
    assert log.items.tolist() == [1, 2]  # user 2**63 first, with item 2**63 (id 1)


@pytest.mark.parametrize("kind", [list, tuple])
def test_id_lists_mixing_integers_and_text_are_read_as_object_arrays(kind):
    # numpy would turn [1, "1"] into the strings ["1", "1"]: two users become one.
    with pytest.raises(ValueError, match=r"users holds the ids 1 and '1', one id once written"):
        InteractionLog(kind([1, "1"]), [1, 1], [0, 0])
    with pytest.raises(ValueError, match=r"items holds the ids '7' and 7, one id once written"):
        InteractionLog([1, 1], kind(["7", 7]), [0, 0])
    log = InteractionLog(kind([2, "a"]), [1, 1], [0, 0])  # no clash: text, as an object array
    assert log.user_ids.tolist() == ["2", "a"]
    with pytest.raises(TypeError, match=r"users must hold integer or string ids, got b'1'"):
        InteractionLog(kind([b"1", 1]), [1, 1], [0, 0])


def test_empty_log():
    log = InteractionLog([], [], [])
    assert (log.num_users, log.num_items, log.num_events) == (0, 0, 0)
    assert log.offsets.tolist() == [0]
    log.validate()


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([1, 2], [1], [1, 2]), ValueError, r"equal lengths, got 2, 1 and 2"),
        (
            ([1, 1], [1, 2], [2.0, 1.5]),
            ValueError,
            r"timestamps\[1\]=1.5 is not a whole number of seconds",
        ),
        (([1], [1], [float("nan")]), ValueError, r"timestamps\[0\]=nan is not a whole number"),
        (([1], [1], [2.0**63]), ValueError, r"timestamps\[0\]=9.2\d+e\+18 is not a whole number"),
        (([1], [1], ["5"]), TypeError, r"timestamps must be integers"),
        (([1.0], [1], [1]), TypeError, r"users must hold integer or string ids, got dtype float64"),
        (([[1]], [1], [1]), ValueError, r"users must be 1-D, got shape \(1, 1\)"),
        (
            ([1], [1], np.array([2**63], np.uint64)),
            ValueError,
            r"timestamps\[0\]=9223372036854775808 does not fit int64",
        ),
    ],
)
def test_constructor_errors(args, error, match):
    with pytest.raises(error, match=match):
        InteractionLog(*args)


def test_integral_float_timestamps_are_seconds():
    """RecBole's ``timestamp:float`` columns hold integral values: they are read as int64."""
    floats = InteractionLog([1, 1, 2], [5, 6, 5], np.array([881250949.0, 3.0, -2.0]))
    ints = InteractionLog([1, 1, 2], [5, 6, 5], np.array([881250949, 3, -2]))
    assert floats.timestamps.dtype == np.int64
    for name in ("offsets", "items", "timestamps"):
        np.testing.assert_array_equal(getattr(floats, name), getattr(ints, name))


def _csr_parts():
    log = InteractionLog([0, 0, 1, 1, 1], [1, 2, 3, 1, 2], [1, 2, 3, 4, 5])
    return {n: getattr(log, n).copy() for n in ("offsets", "items", "timestamps", "user_ids", "item_ids")}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"offsets": np.array([1, 2, 5])}, ValueError, r"offsets\[0\] must be 0, got 1"),
        ({"offsets": np.array([0, 2, 4])}, ValueError, r"offsets\[-1\]=4 must equal len\(items\)=5"),
        ({"offsets": np.array([0, 3, 2, 5])}, ValueError, r"offsets decrease at index 2: 2 < 3"),
        ({"offsets": np.array([0.0, 2, 5])}, TypeError, r"offsets must have an integer dtype"),
        ({"timestamps": np.arange(4)}, ValueError, r"timestamps has 4 entries, items has 5"),
        ({"items": np.array([1, 2, 3, 0, 2])}, ValueError, r"items\[3\]=0 is outside \[1, 3\]"),
        ({"items": np.array([1, 2, 4, 1, 2])}, ValueError, r"items\[2\]=4 is outside \[1, 3\]"),
        ({"timestamps": np.array([1, 2, 3, 5, 4])}, ValueError,
         r"timestamps decrease within a user at index 4: 4 < 5"),
        ({"user_ids": np.array([7])}, ValueError, r"user_ids has 1 entries for 2 users"),
    ],
)  # fmt: skip
def test_validate_names_the_first_violation(change, error, match):
    parts = {**_csr_parts(), **change}
    with pytest.raises(error, match=match):
        InteractionLog.from_csr(**parts)
    InteractionLog.from_csr(**parts, validate=False)  # wraps as is when asked not to check


def test_from_csr_takes_cpu_tensors():
    parts = _csr_parts()
    log = InteractionLog.from_csr(**{n: torch.from_numpy(a) for n, a in parts.items()})
    assert isinstance(log.items, np.ndarray) and log.items.tolist() == parts["items"].tolist()


def test_validate_allows_time_to_go_back_between_users():
    parts = _csr_parts()
    parts["timestamps"] = np.array([10, 20, 3, 4, 5])
    InteractionLog.from_csr(**parts).validate()


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.skipif(_ext.C is None, reason="no _C")), "torch"])  # fmt: skip
def test_memmap_round_trip_feeds_encode_batch(tmp_path, monkeypatch, backend):
    rng = np.random.default_rng(1)
    n = 500
    log = InteractionLog(rng.integers(0, 20, n), rng.integers(0, 60, n), rng.integers(0, 10**9, n))
    log.save(tmp_path / "log")
    assert sorted(os.listdir(tmp_path / "log")) == sorted(
        ["meta.json"] + [f"{a}.npy" for a in ("offsets", "items", "timestamps", "user_ids", "item_ids")]
    )  # fmt: skip
    loaded = InteractionLog.load(tmp_path / "log")
    for name in ("offsets", "items", "timestamps", "user_ids", "item_ids"):
        a = getattr(loaded, name)
        assert isinstance(a, np.memmap), name
        assert np.array_equal(a, getattr(log, name)), name
    loaded.validate()
    assert not isinstance(InteractionLog.load(tmp_path / "log", mmap=False).items, np.memmap)

    rows = rng.integers(0, loaded.num_users, 16)
    ends = rng.integers(1, loaded.lengths[rows] + 1)
    kw = dict(num_items=loaded.num_items, num_negatives=2, backend=backend)
    if backend == "cpp":  # the mapped arrays reach the extension without a copy
        seen = []
        real = _ext.C.encode_batch
        monkeypatch.setattr(_ext.C, "encode_batch", lambda *a: seen.append(a) or real(*a))
    got = encode_batch(loaded.offsets, loaded.items, loaded.timestamps, rows, ends, 32, **kw)
    want = encode_batch(log.offsets, log.items, log.timestamps, rows, ends, 32, **kw)
    for f in ("items", "timestamps", "time_buckets", "mask", "targets", "negatives"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    if backend == "cpp":
        args = seen[0]
        assert args[1] is loaded.items and args[2] is loaded.timestamps


def test_string_ids_round_trip(tmp_path):
    log = InteractionLog(["u2", "u1", "u2"], ["b", "a", "c"], [3, 2, 1])
    log.save(tmp_path)
    loaded = InteractionLog.load(tmp_path, validate=True)
    assert loaded.user_ids.tolist() == ["u1", "u2"] and loaded.item_ids.tolist() == ["a", "b", "c"]
    assert loaded.items.tolist() == log.items.tolist()
    log.save(tmp_path)  # overwriting a folder that is memory-mapped right now is fine
    assert InteractionLog.load(tmp_path).items.tolist() == log.items.tolist()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        InteractionLog.load(tmp_path)
    log = InteractionLog([0, 1], [1, 2], [0, 0])
    log.save(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "num_events": 3}))
    with pytest.raises(ValueError, match="do not match meta.json sizes"):
        InteractionLog.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ValueError, match="unknown format 'other/9'"):
        InteractionLog.load(tmp_path)


# ---------------------------------------------------------------------------- time units
MS = np.array([1_700_000_000_900, 1_700_000_000_100, 1_700_000_002_000])


@pytest.mark.parametrize(
    ("scale", "name", "unit"),
    [(1, "milliseconds", "ms"), (10**3, "microseconds", "us"), (10**6, "nanoseconds", "ns")],
)
def test_epoch_timestamps_in_a_finer_unit_are_refused(scale, name, unit):
    with pytest.raises(ValueError, match=rf"timestamps look like {name} since 1970, not seconds "
                                         rf".* pass InteractionLog\(\.\.\., time_unit='{unit}'\)"):  # fmt: skip
        InteractionLog([1, 1, 1], [5, 6, 7], MS * scale)
    log = InteractionLog([1, 1, 1], [5, 6, 7], MS * scale, time_unit=unit)
    # ordered by the given timestamps, kept as whole seconds
    assert log.item_ids[log.items - 1].tolist() == [6, 5, 7]
    assert log.timestamps.tolist() == [1_700_000_000, 1_700_000_000, 1_700_000_002]


def test_time_unit_s_keeps_large_seconds_and_checks_its_value():
    log = InteractionLog([1, 1], [5, 6], MS[:2], time_unit="s")
    assert log.timestamps.tolist() == sorted(MS[:2].tolist())
    assert InteractionLog([1], [5], [-(10**10)]).timestamps.tolist() == [-(10**10)]  # year 1653
    with pytest.raises(ValueError, match=r"time_unit='h' is not one of \['s', 'ms', 'us', 'ns'\]"):
        InteractionLog([1], [5], [1], time_unit="h")
    with pytest.raises(TypeError, match=r"time_unit must be a str or None, got int"):
        InteractionLog([1], [5], [1], time_unit=1000)


@pytest.mark.parametrize(
    ("file", "damage", "match"),
    [
        ("meta.json", b"", r"meta.json is damaged: it is empty"),
        ("meta.json", b'{"format": "spnn_fast.Interac', r"meta.json is damaged: it is not valid JSON"),
        ("meta.json", b"[1, 2]", r"meta.json does not hold a JSON object"),
        ("meta.json", b'{"format": "spnn_fast.InteractionLog/1"}',
         r"meta.json lacks num_users, num_items, num_events"),
        ("items.npy", b"", r"items.npy is damaged: it is empty"),
        ("items.npy", b"not an array at all", r"items.npy is damaged: it is not a \.npy array"),
        ("timestamps.npy", "half", r"timestamps.npy is damaged: it is cut short or not a \.npy"),
        ("user_ids.npy", "objects", r"user_ids.npy is damaged: it is not a \.npy array of "
                                    r"numbers or text"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mmap", [True, False])
def test_load_names_a_damaged_file(tmp_path, file, damage, match, mmap):
    InteractionLog([0, 1, 1], [1, 2, 3], [5, 6, 7]).save(tmp_path)
    path = tmp_path / file
    if damage == "half":
        data = path.read_bytes()
        damage = data[: len(data) - 8]
    elif damage == "objects":
        np.save(path, np.array(["a", 1], dtype=object), allow_pickle=True)
        damage = path.read_bytes()
    path.write_bytes(damage)
    with pytest.raises(ValueError, match=match) as err:
        InteractionLog.load(tmp_path, mmap=mmap)
    assert "pickle" not in str(err.value) and "save the log again" in str(err.value)


def test_load_names_a_missing_array(tmp_path):
    InteractionLog([0, 1], [1, 2], [5, 6]).save(tmp_path)
    (tmp_path / "items.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"items.npy: the saved log lacks it"):
        InteractionLog.load(tmp_path)
