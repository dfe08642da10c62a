"""encode_batch: hand-checked cases, a pure-Python oracle, C++ == numpy reference bit for bit,
thread-count independence, negatives statistics, every bad input on both backends, zero copy."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spnn_fast import _ext, backends
from spnn_fast.encode import IGNORE_INDEX, SequenceBatch, encode_batch, release_cached_buffers
from spnn_fast.reference.encode import mix_seed, splitmix64_np

BACKENDS = ["cpp", "torch"]
X = IGNORE_INDEX  # the target of a position without one
FIELDS = ("items", "timestamps", "time_buckets", "mask", "targets", "negatives", "users")
M64 = (1 << 64) - 1

needs_cpp = pytest.mark.skipif(_ext.C is None, reason="spnn_fast._C did not build")


def _backend_params():
    return [pytest.param("cpp", marks=needs_cpp), "torch"]


# ----------------------------------------------------------------------------- helpers
def _csr(lengths):
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _random_log(rng, num_users, max_events, num_items, gap_bits=20):
    lengths = rng.integers(1, max_events + 1, num_users)
    offsets = _csr(lengths)
    n = int(offsets[-1])
    items = rng.integers(1, num_items + 1, n)
    times = np.cumsum(rng.integers(0, 1 << gap_bits, n)) - (1 << 40)
    return offsets, items, times, lengths


def _random_rows(rng, lengths, batch):
    rows = rng.integers(0, len(lengths), batch)
    ends = rng.integers(1, lengths[rows] + 1) if batch else np.zeros(0, np.int64)
    return rows, ends


def assert_batch_equal(got: SequenceBatch, want: SequenceBatch, what: str = "") -> None:
    """Bit-identical fields; on a difference, say which field, where, and both values."""
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        if a is None or b is None:
            assert a is None and b is None, f"{what}{f}: {a is None=} {b is None=}"
            continue
        assert a.dtype == b.dtype, f"{what}{f}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{what}{f}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        diff = (a != b).nonzero()
        if len(diff):
            idx = tuple(diff[0].tolist())
            raise AssertionError(
                f"{what}{f}: {len(diff)} entries differ, first at {idx}: {a[idx]} != {b[idx]}"
            )


def _splitmix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _oracle(offsets, items, times, rows, ends, max_len, *, num_items, num_time_buckets=32,
            num_negatives=0, seed=0, pad_side="left", target_ends=None,
            ignore_index=-100):  # fmt: skip
    """The spec, one slot at a time, in Python ints (exact gaps, IEEE doubles for negatives)."""
    L, K, V = max_len, num_negatives, num_items
    items, times = [int(x) for x in items], [int(x) for x in times]
    out = {f: np.zeros((len(rows), L), np.int64) for f in FIELDS[:5]}
    out["mask"] = out["mask"].astype(bool)
    out["targets"][:] = ignore_index
    neg = np.zeros((len(rows), L, K), np.int64)
    mix = _splitmix(seed & M64)
    for b, (u, e) in enumerate(zip(rows.tolist(), ends.tolist())):
        start, length = int(offsets[u]), int(offsets[u + 1] - offsets[u])
        te = e if target_ends is None else int(target_ends[b])
        s = max(0, e - L)
        c0 = L - (e - s) if pad_side == "left" else 0
        for j, p in enumerate(range(s, e), start=c0):
            out["items"][b, j] = items[start + p]
            out["timestamps"][b, j] = times[start + p]
            out["mask"][b, j] = True
            if p > 0:
                gap = times[start + p] - times[start + p - 1]
                out["time_buckets"][b, j] = min(num_time_buckets - 1, gap.bit_length())
            target = items[start + p + 1] if p + 1 < min(te, length) else ignore_index
            out["targets"][b, j] = target
            for k in range(K if 1 <= target <= V else 0):
                h = _splitmix((mix + (b * L + j) * K + k) & M64)
                idx = min(V - 2, int(float(h >> 11) * 2.0**-53 * float(V - 1)))
                neg[b, j, k] = idx + 1 + (idx + 1 >= target)
    return SequenceBatch(
        **{f: torch.from_numpy(v) for f, v in out.items()},
        negatives=torch.from_numpy(neg) if K else None,
        users=torch.as_tensor(np.asarray(rows, dtype=np.int64)),
        ignore_index=ignore_index,
    )


# ----------------------------------------------------------------------------- hand cases
# user 0: items 3 1 2 at 100 101 105;  user 1: 5 4 4 2 1 at 0 3 4 12 12+2**40;  user 2: 2 at 7
OFFSETS = np.array([0, 3, 8, 9])
ITEMS = np.array([3, 1, 2, 5, 4, 4, 2, 1, 2])
TIMES = np.array([100, 101, 105, 0, 3, 4, 12, 12 + 2**40, 7])


def _hand(rows, ends, max_len, backend, **kw):
    kw.setdefault("num_items", 5)
    return encode_batch(OFFSETS, ITEMS, TIMES, np.array(rows), np.array(ends), max_len,
                        backend=backend, **kw)  # fmt: skip


@pytest.mark.parametrize("backend", _backend_params())
def test_hand_window_inside_history(backend):
    # user 1, end 4, L = 3: positions 1..3; the first gap reaches back to position 0 (3 - 0).
    b = _hand([1], [4], 3, backend)
    assert b.items.tolist() == [[4, 4, 2]]
    assert b.timestamps.tolist() == [[3, 4, 12]]
    assert b.time_buckets.tolist() == [[2, 1, 4]]  # bit_length(3, 1, 8)
    assert b.mask.tolist() == [[True, True, True]]
    # By default no target lies at or past ends: the window's last position has none ...
    assert b.targets.tolist() == [[4, 2, X]]
    assert b.negatives is None
    # ... and target_ends = ends + 1 makes the event after the window (position 4) its target.
    assert _hand([1], [4], 3, backend, target_ends=[5]).targets.tolist() == [[4, 2, 1]]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_hand_whole_history_padded(backend, pad_side):
    # user 1, end = len = 5, L = 8: p == 0 gets bucket 0, the last event has no target, and the
    # 2**40 gap is clipped to NB - 1 = 31.
    b = _hand([1], [5], 8, backend, pad_side=pad_side)
    ev = {
        "items": [5, 4, 4, 2, 1],
        "timestamps": [0, 3, 4, 12, 12 + 2**40],
        "time_buckets": [0, 2, 1, 4, 31],
        "mask": [True] * 5,
        "targets": [4, 4, 2, 1, X],
    }
    for f, events in ev.items():
        pad = [False if f == "mask" else X if f == "targets" else 0] * 3
        want = pad + events if pad_side == "left" else events + pad
        assert getattr(b, f).tolist() == [want], f


@pytest.mark.parametrize("backend", _backend_params())
def test_hand_several_rows(backend):
    rows, ends = [0, 2, 1, 0], [2, 1, 1, 3]
    b = _hand(rows, ends, 2, backend, num_time_buckets=3, pad_side="right")
    assert b.items.tolist() == [[3, 1], [2, 0], [5, 0], [1, 2]]
    assert b.timestamps.tolist() == [[100, 101], [7, 0], [0, 0], [101, 105]]
    assert b.time_buckets.tolist() == [[0, 1], [0, 0], [0, 0], [1, 2]]  # bit_length(4)=3 -> 2
    assert b.mask.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    assert b.targets.tolist() == [[1, X], [X, X], [X, X], [2, X]]
    nxt = _hand(rows, ends, 2, backend, pad_side="right", target_ends=[3, 1, 2, 3])
    assert nxt.targets.tolist() == [[1, 2], [X, X], [4, X], [2, X]]


@pytest.mark.parametrize("backend", _backend_params())
def test_hand_negatives_two_items(backend):
    # With V = 2 the only negative is the other item; slots without a target hold 0.
    offsets, items, times = np.array([0, 4]), np.array([1, 2, 2, 1]), np.array([0, 1, 2, 3])
    b = encode_batch(offsets, items, times, np.array([0, 0]), np.array([4, 2]), 4,
                     num_items=2, num_negatives=3, target_ends=[4, 3], backend=backend)  # fmt: skip
    other = {1: [2, 2, 2], 2: [1, 1, 1], X: [0, 0, 0]}
    assert b.targets.tolist() == [[2, 2, 1, X], [X, X, 2, 2]]
    assert b.negatives.tolist() == [[other[t] for t in row] for row in b.targets.tolist()]


@pytest.mark.parametrize("backend", _backend_params())
def test_targets_are_loss_ready(backend):
    """The obvious call trains only real targets: linear_cross_entropy over an item table whose
    row i is item i (row 0 padding), with PyTorch's default ignore_index, equals the loss over
    the positions that have a target, and F.cross_entropy agrees."""
    from spnn_fast.functional import linear_cross_entropy

    rng = np.random.default_rng(0)
    offsets, items, times, lengths = _random_log(rng, 12, 20, 30)
    rows, ends = _random_rows(rng, lengths, 10)
    b = encode_batch(offsets, items, times, rows, ends, 8, num_items=30, backend=backend)
    assert bool((b.targets[~b.mask] == -100).all()) and bool((b.targets > 0).any())
    torch.manual_seed(0)
    hidden, table = torch.randn(*b.targets.shape, 6), torch.randn(31, 6)
    got = linear_cross_entropy(hidden, table, b.targets)
    sel = b.targets > 0
    want = torch.nn.functional.cross_entropy(hidden[sel] @ table.T, b.targets[sel])
    torch.testing.assert_close(got, want)
    plain = torch.nn.functional.cross_entropy((hidden @ table.T).transpose(1, 2), b.targets)
    torch.testing.assert_close(plain, want)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("ignore_index", [0, -1, 31, 2**40])
def test_ignore_index_is_the_target_without_one(backend, ignore_index):
    rng = np.random.default_rng(1)
    offsets, items, times, lengths = _random_log(rng, 12, 20, 30)
    rows, ends = _random_rows(rng, lengths, 10)
    kw = dict(num_items=30, num_negatives=3, seed=4, backend=backend)
    base = encode_batch(offsets, items, times, rows, ends, 8, **kw)
    got = encode_batch(offsets, items, times, rows, ends, 8, ignore_index=ignore_index, **kw)
    assert got.ignore_index == ignore_index
    want = _oracle(offsets, items, times, rows, ends, 8, num_items=30, num_negatives=3, seed=4,
                   ignore_index=ignore_index)  # fmt: skip
    assert_batch_equal(got, want)
    has = base.targets > 0
    assert torch.equal(got.targets[has], base.targets[has])
    assert bool((got.targets[~has] == ignore_index).all())
    assert torch.equal(got.negatives, base.negatives)  # negatives do not depend on it


@pytest.mark.parametrize(
    "value, err, match",
    [
        (1, ValueError, r"ignore_index must be an int64 that is not an item id in \[1, 5\], got 1"),
        (5, ValueError, r"not an item id in \[1, 5\], got 5"),
        (2**63, ValueError, r"ignore_index must be an int64"),
        (True, TypeError, r"ignore_index must be an int, got bool"),
        (-100.0, TypeError, r"ignore_index must be an int, got float"),
    ],
)
def test_bad_ignore_index(value, err, match):
    with pytest.raises(err, match=match):
        _hand([1], [4], 3, "torch", ignore_index=value)


def test_tail_and_cut_check_their_arguments():
    b = _hand([0, 1, 2], [3, 5, 1], 4, "torch", target_ends=[3, 5, 1])
    for n, err, match in [
        (0, ValueError, r"n must be >= 1 \(tail keeps the last n columns\), got 0"),
        (-2, ValueError, r"n must be >= 1"),
        (2.0, TypeError, r"n must be an int, got float"),
    ]:
        with pytest.raises(err, match=match):
            b.tail(n)
    assert b.tail(9) is b and b.tail(2).items.tolist() == b.items[:, -2:].tolist()
    for keep, err, match in [
        (-1, ValueError, r"keep must be >= 0 \(events kept per row\), got keep\[0\]=-1"),
        (torch.tensor([1, -3, 2]), ValueError, r"got keep\[1\]=-3"),
        (
            torch.tensor([1, 2]),
            ValueError,
            r"keep must be an int or \[B=3\] integers \(one per row\), got shape \(2,\)",
        ),
        (np.ones((3, 1), np.int64), ValueError, r"keep must be 1-D"),
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, r"keep must hold integers"),
        (True, TypeError, r"keep must be an int or \[B\] integers, got bool"),
        ([1.5, 2, 3], TypeError, r"keep must have an integer dtype"),
    ]:
        with pytest.raises(err, match=match):
            b.cut(keep)
    # An int, a list, a numpy array and a tensor cut alike; keep >= L keeps the row whole.
    one = b.cut(1)
    for keep in ([1, 1, 1], np.ones(3, np.int32), torch.ones(3, dtype=torch.int64)):
        assert_batch_equal(b.cut(keep), one)
    assert_batch_equal(b.cut(4), b)
    assert_batch_equal(b.cut([9, 4, 100]), b)
    # Hidden columns become padding: items 0, mask False, targets ignore_index.
    none = b.cut(0)
    assert not bool(none.mask.any()) and int(none.items.abs().sum()) == 0
    assert bool((none.targets == X).all())
    assert one.targets[:, :-1].eq(X).all() and torch.equal(one.targets[:, -1], b.targets[:, -1])


def test_splitmix64_known_values():
    # First outputs of SplitMix64 seeded with 0 (published test vector).
    state = np.array([k * 0x9E3779B97F4A7C15 & M64 for k in range(4)], dtype=np.uint64)
    assert [f"{int(x):016x}" for x in splitmix64_np(state)] == [
        "e220a8397b1dcdaf",
        "6e789e6aa1b965f4",
        "06c45d188009454f",
        "f88bb8a8724c81ec",
    ]
    assert mix_seed(0) == 0xE220A8397B1DCDAF
    assert mix_seed(-1) == _splitmix(M64) and mix_seed(1 << 64) == mix_seed(0)


@pytest.mark.parametrize("backend", _backend_params())
def test_gap_beyond_int64(backend):
    # Ordered timestamps can differ by more than 2**63: the gap is still exact (bit_length 64).
    lo, hi = -(2**63), 2**63 - 1
    b = encode_batch(np.array([0, 3]), np.array([1, 1, 1]), np.array([lo, lo + 1, hi]),
                     np.array([0]), np.array([3]), 3, num_items=1, num_time_buckets=70,
                     backend=backend)  # fmt: skip
    assert b.time_buckets.tolist() == [[0, 1, 64]]


# ----------------------------------------------------------------------------- random cases
@st.composite
def problems(draw):
    num_users = draw(st.integers(1, 6))
    lengths = np.array(draw(st.lists(st.integers(0, 25), min_size=num_users, max_size=num_users)))
    lengths[draw(st.integers(0, num_users - 1))] += 1  # at least one user with an event
    offsets = _csr(lengths)
    n = int(offsets[-1])
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    num_items = draw(st.integers(1, 40))
    items = rng.integers(1, num_items + 1, n)
    gap_bits = draw(st.sampled_from([1, 3, 20, 62]))
    # Gaps below 2**gap_bits, shrunk for the widest so that the cumulative sum cannot overflow.
    times = np.cumsum(rng.integers(0, 1 << gap_bits, n) // (n if gap_bits == 62 else 1))
    users = np.flatnonzero(lengths)
    batch = draw(st.integers(0, 12))
    rows = rng.choice(users, batch)
    ends = rng.integers(1, lengths[rows] + 1) if batch else np.zeros(0, np.int64)
    lengths_of_rows = lengths[rows] if batch else np.zeros(0, np.int64)
    kw = dict(
        target_ends=draw(st.sampled_from([None, "next", "random"])),
        num_items=num_items,
        num_time_buckets=draw(st.integers(1, 70)),
        num_negatives=draw(st.integers(0, 3)) if num_items >= 2 else 0,
        seed=draw(st.integers(-(2**70), 2**70)),
        pad_side=draw(st.sampled_from(["left", "right"])),
    )
    if kw["target_ends"] == "next":
        kw["target_ends"] = np.minimum(ends + 1, lengths_of_rows)
    elif kw["target_ends"] == "random":
        kw["target_ends"] = rng.integers(0, lengths_of_rows + 1)
    return (offsets, items, times, rows, ends, draw(st.integers(1, 30))), kw


_hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(problems())
def test_reference_matches_oracle(problem):
    args, kw = problem
    assert_batch_equal(encode_batch(*args, backend="torch", **kw), _oracle(*args, **kw))


@needs_cpp
@_hyp
@given(problems(), st.integers(1, 4))
def test_cpp_matches_reference(problem, threads):
    args, kw = problem
    got = encode_batch(*args, backend="cpp", num_threads=threads, **kw)
    assert_batch_equal(got, encode_batch(*args, backend="torch", **kw))


@pytest.mark.parametrize("backend", _backend_params())
def test_default_targets_never_read_at_or_past_ends(backend):
    """A window's default targets stop before ``ends``: the events from ``ends`` on are never
    read, so a held-out event there can neither leak into training nor fail the call."""
    rng = np.random.default_rng(3)
    offsets, items, times, lengths = _random_log(rng, 30, 50, 40)
    rows, ends = _random_rows(rng, lengths, 64)
    ok = ends < lengths[rows]
    rows, ends = rows[ok], ends[ok]
    _, one = np.unique(rows, return_index=True)  # one window per user: no window holds another's
    rows, ends = rows[one], ends[one]  # poisoned event
    poisoned = items.copy()
    poisoned[offsets[rows] + ends] = 41  # outside [1, V]: reading it would raise
    b = encode_batch(offsets, poisoned, times, rows, ends, 8, num_items=40, backend=backend)
    assert bool((b.targets[:, -1] == X).all())
    want = encode_batch(offsets, items, times, rows, ends, 8, num_items=40, backend=backend)
    assert_batch_equal(b, want)
    with pytest.raises(ValueError, match=r"items\[\d+\]=41 is outside \[1, 40\]"):
        encode_batch(offsets, poisoned, times, rows, ends, 8, num_items=40, backend=backend,
                     target_ends=ends + 1)  # fmt: skip


@pytest.mark.parametrize("backend", _backend_params())
def test_target_ends_and_array_likes_are_checked(backend):
    args = (OFFSETS, ITEMS, TIMES, np.array([1]), np.array([4]), 3)
    with pytest.raises(ValueError, match=r"target_ends\[0\]=6 is outside \[0, 5\]"):
        encode_batch(*args, num_items=5, target_ends=[6], backend=backend)
    with pytest.raises(ValueError, match=r"target_ends must have one entry per row, got 2 for 1"):
        encode_batch(*args, num_items=5, target_ends=[5, 5], backend=backend)
    with pytest.raises(TypeError, match="target_ends must have an integer dtype"):
        encode_batch(*args, num_items=5, target_ends=[4.5], backend=backend)
    # Any array-like of integers: lists and tuples give the same batch as arrays.
    listed = encode_batch(OFFSETS.tolist(), tuple(ITEMS.tolist()), TIMES.tolist(), [1], (4,), 3,
                          num_items=5, backend=backend)  # fmt: skip
    assert_batch_equal(listed, encode_batch(*args, num_items=5, backend=backend))
    empty = encode_batch(OFFSETS, ITEMS, TIMES, [], [], 3, num_items=5, backend=backend)
    assert empty.items.shape == (0, 3)
    with pytest.raises(TypeError, match="rows must have an integer dtype"):
        encode_batch(OFFSETS, ITEMS, TIMES, [1.0], [4], 3, num_items=5, backend=backend)


@needs_cpp
def test_thread_count_independent():
    rng = np.random.default_rng(7)
    offsets, items, times, lengths = _random_log(rng, 50, 60, 1000)
    rows, ends = _random_rows(rng, lengths, 37)
    kw = dict(num_items=1000, num_negatives=5, seed=123)
    want = encode_batch(offsets, items, times, rows, ends, 16, backend="torch", **kw)
    for threads in (1, 2, 3, 8, None):
        got = encode_batch(offsets, items, times, rows, ends, 16, backend="cpp",
                           num_threads=threads, **kw)  # fmt: skip
        assert_batch_equal(got, want, f"threads={threads}: ")


@pytest.mark.parametrize("backend", _backend_params())
def test_negatives_statistics(backend):
    num_items, K = 7, 8
    rng = np.random.default_rng(3)
    offsets = np.array([0, 3001])
    items = rng.integers(1, num_items + 1, 3001)
    times = np.arange(3001)
    rows, ends = np.zeros(15, np.int64), rng.integers(200, 3002, 15)
    ends[0] = 3001  # one window ends at the last event: its last target is 0
    b = encode_batch(offsets, items, times, rows, ends, 200, num_items=num_items,
                     num_negatives=K, seed=11, backend=backend)  # fmt: skip
    tgt = b.targets[..., None].expand_as(b.negatives)
    neg = b.negatives[tgt > 0]
    t = tgt[tgt > 0]
    assert bool((b.negatives[tgt == X] == 0).all())
    assert bool(((neg >= 1) & (neg <= num_items) & (neg != t)).all())
    # Uniform over the V - 1 other items: per target, a chi-square over the other items, with a
    # bound far in the tail (df = 5: P[chi2 > 40] < 1e-6); the seed is fixed, so it cannot flake.
    for target in range(1, num_items + 1):
        sel = neg[t == target]
        counts = torch.bincount(sel, minlength=num_items + 1)[1:].double()
        assert counts[target - 1] == 0
        expected = len(sel) / (num_items - 1)
        others = torch.cat([counts[: target - 1], counts[target:]])
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert len(sel) > 2000 and chi2 < 40.0, (target, len(sel), chi2, others.tolist())


def test_negatives_large_catalogue_in_range():
    V = 10**6
    rng = np.random.default_rng(5)
    offsets, items, times, lengths = _random_log(rng, 20, 40, V)
    rows, ends = _random_rows(rng, lengths, 20)
    b = encode_batch(offsets, items, times, rows, ends, 40, num_items=V, num_negatives=16,
                     backend="torch")  # fmt: skip
    neg = b.negatives[b.targets > 0]
    assert int(neg.min()) >= 1 and int(neg.max()) <= V
    assert bool((neg != b.targets[b.targets > 0][:, None]).all())
    assert len(torch.unique(neg)) > 0.99 * neg.numel()  # no visible structure at this size


# ----------------------------------------------------------------------------- input forms
@pytest.mark.parametrize("backend", _backend_params())
def test_int32_noncontiguous_and_tensor_inputs(backend):
    rng = np.random.default_rng(2)
    offsets, items, times, lengths = _random_log(rng, 10, 30, 50)
    rows, ends = _random_rows(rng, lengths, 9)
    kw = dict(num_items=50, num_negatives=2, backend=backend)
    want = encode_batch(offsets, items, times, rows, ends, 12, **kw)

    def strided(a):
        s = np.zeros(2 * len(a), a.dtype)
        s[::2] = a
        return s[::2]

    forms = {
        "int32": [a.astype(np.int32) for a in (offsets, items)] + [times],
        "uint16": [offsets.astype(np.uint32), items.astype(np.uint16), times],
        "strided": [strided(a) for a in (offsets, items, times)],
        "tensor": [torch.from_numpy(a) for a in (offsets, items, times)],
        "tensor_strided": [torch.from_numpy(strided(a)) for a in (offsets, items, times)],
    }
    assert not forms["strided"][1].flags.c_contiguous
    for name, log in forms.items():
        if name.startswith("tensor"):
            r, e = torch.from_numpy(rows), torch.from_numpy(ends).int()
        else:
            r, e = rows.astype(np.int16), ends
        assert_batch_equal(encode_batch(*log, r, e, 12, **kw), want, f"{name}: ")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("K", [0, 3])
def test_empty_batch(backend, K):
    empty = np.zeros(0, np.int64)
    b = encode_batch(OFFSETS, ITEMS, TIMES, empty, empty, 5, num_items=5, num_negatives=K,
                     backend=backend)  # fmt: skip
    for f in FIELDS[:5]:
        assert tuple(getattr(b, f).shape) == (0, 5), f
    assert b.mask.dtype == torch.bool and b.items.dtype == torch.int64
    assert (b.negatives is None) if K == 0 else tuple(b.negatives.shape) == (0, 5, 3)
    # An empty log works too, as long as no row asks for it.
    b = encode_batch(np.zeros(1, np.int64), empty, empty, empty, empty, 4, num_items=1,
                     backend=backend)  # fmt: skip
    assert tuple(b.items.shape) == (0, 4)


# ----------------------------------------------------------------------------- bad input
def _bad_item_at(i, value):
    items = ITEMS.copy()
    items[i] = value
    return {"items": items}


def _bad_time_at(i, value):
    times = TIMES.copy()
    times[i] = value
    return {"timestamps": times}


BAD = [
    ({"max_len": 0}, ValueError, r"max_len must be >= 1, got 0"),
    ({"pad_side": "middle"}, ValueError, r"pad_side must be 'left' or 'right', got 'middle'"),
    ({"num_negatives": -1}, ValueError, r"num_negatives must be >= 0, got -1"),
    ({"num_negatives": 2, "num_items": 1}, ValueError,
     r"num_items must be >= 2 to sample negatives \(num_negatives=2\), got 1"),
    ({"num_items": 0}, ValueError, r"num_items must be >= 1, got 0"),
    ({"num_time_buckets": 0}, ValueError, r"num_time_buckets must be >= 1, got 0"),
    ({"num_threads": 0}, ValueError, r"num_threads must be >= 1, got 0"),
    ({"max_len": 2.0}, TypeError, r"max_len must be an int, got float"),
    ({"seed": 1.5}, TypeError, r"seed must be an int, got float"),
    ({"ends": np.array([2, 1])}, ValueError,
     r"rows and ends must have equal lengths, got 3 and 2"),
    ({"offsets": OFFSETS[None]}, ValueError, r"offsets must be 1-D, got shape \(1, 4\)"),
    ({"offsets": np.zeros(0, np.int64)}, ValueError, r"offsets must have at least one entry"),
    ({"offsets": np.array([1, 3, 8, 9])}, ValueError, r"offsets\[0\] must be 0, got 1"),
    ({"offsets": np.array([0, 5, 3, 9])}, ValueError, r"offsets decrease at index 2: 3 < 5"),
    ({"offsets": np.array([0, 3, 8, 8])}, ValueError,
     r"offsets\[-1\]=8 must equal len\(items\)=9"),
    ({"timestamps": TIMES[:-1]}, ValueError, r"timestamps has 8 entries, items has 9"),
    ({"rows": np.array([0, 3, 1])}, ValueError, r"rows\[1\]=3 is outside \[0, 3\)"),
    ({"rows": np.array([0, 1, -1])}, ValueError, r"rows\[2\]=-1 is outside \[0, 3\)"),
    ({"ends": np.array([1, 2**64 - 1, 1], np.uint64)}, ValueError,
     r"ends\[1\]=18446744073709551615 does not fit int64"),
    ({"ends": np.array([0, 1, 1])}, ValueError,
     r"ends\[0\]=0 is outside \[1, 3\] \(the length of user 0 at rows\[0\]\)"),
    ({"ends": np.array([3, 6, 1])}, ValueError,
     r"ends\[1\]=6 is outside \[1, 5\] \(the length of user 1 at rows\[1\]\)"),
    # Items read: window positions and, asked for with target_ends, the target after the window.
    (_bad_item_at(4, 0), ValueError, r"items\[4\]=0 is outside \[1, 5\]"),
    ({**_bad_item_at(7, 6), "target_ends": np.array([3, 5, 1])}, ValueError,
     r"items\[7\]=6 is outside \[1, 5\]"),  # a target
    ({"target_ends": np.array([3, 5])}, ValueError,
     r"target_ends must have one entry per row, got 2 for 3"),
    ({"target_ends": np.array([3, -1, 1])}, ValueError,
     r"target_ends\[1\]=-1 is outside \[0, 5\] \(the length of user 1 at rows\[1\]\)"),
    (_bad_item_at(8, -7), ValueError, r"items\[8\]=-7 is outside \[1, 5\]"),
    # Two bad items read by different rows: the smaller global index is named.
    ({"items": np.where(np.arange(9) == 1, 9, _bad_item_at(6, 0)["items"])}, ValueError,
     r"items\[1\]=9 is outside \[1, 5\]"),
    # A bad item and a bad timestamp: the item is named first.
    ({**_bad_time_at(5, 2), **_bad_item_at(2, 0)}, ValueError, r"items\[2\]=0 is outside"),
    # Timestamps: pairs inside the window, and the pair reaching back to the event before it.
    (_bad_time_at(5, 2), ValueError, r"timestamps decrease within a user at index 5: 2 < 3"),
    (_bad_time_at(4, -1), ValueError, r"timestamps decrease within a user at index 4: -1 < 0"),
    (_bad_time_at(1, 99), ValueError,
     r"timestamps decrease within a user at index 1: 99 < 100"),
]  # fmt: skip
# rows [0, 1, 2] ends [3, 4, 1], L = 3: user 0 reads items 0..2, user 1 items 4..6 (its window;
# with target_ends 5, also the target 7), user 2 item 8; timestamp pairs: (0,1) (1,2); (3,4)
# (4,5) (5,6); none for user 2.
BASE_CALL = dict(offsets=OFFSETS, items=ITEMS, timestamps=TIMES, rows=np.array([0, 1, 2]),
                 ends=np.array([3, 4, 1]), max_len=3, num_items=5)  # fmt: skip


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize(("change", "error", "match"), BAD)
def test_bad_input(backend, change, error, match):
    with pytest.raises(error, match=match):
        encode_batch(**{**BASE_CALL, **change}, backend=backend)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize(
    "change",
    [
        _bad_item_at(3, 0),  # user 1 position 0: before the window [1, 4)
        _bad_item_at(7, 0),  # user 1 position 4: at ends, not a target by default
        _bad_time_at(7, 0),  # pair (6, 7): timestamps at the target position are not read
        _bad_time_at(8, -5),  # user 2's only event: no pair is read (nor one across users)
    ],
)
def test_bad_events_outside_the_read_set_pass(backend, change):
    # Checks cover exactly what a call reads; InteractionLog.validate() checks a whole log.
    got = encode_batch(**{**BASE_CALL, **change}, backend=backend)
    assert tuple(got.items.shape) == (3, 3)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("items", ITEMS.astype(np.float64), TypeError, r"items must have an integer dtype, got float64"),
        ("offsets", torch.from_numpy(OFFSETS).float(), TypeError,
         r"offsets must have an integer dtype, got torch.float32"),
        ("rows", np.array([True, False, True]), TypeError, r"rows must have an integer dtype, got bool"),
        ("ends", [3.0, 4.0, 1.0], TypeError, r"ends must have an integer dtype, got float64"),
        ("ends", [3, "4", 1], TypeError, r"ends must have an integer dtype, got <U\d+"),
        ("rows", [[0, 1, 2]], ValueError, r"rows must be 1-D, got shape \(1, 3\)"),
        ("timestamps", torch.zeros(9, dtype=torch.int64, device="meta"), ValueError,
         r"timestamps must be on the CPU, got a tensor on meta"),
    ],
)  # fmt: skip
def test_bad_array_types(backend, name, value, error, match):
    with pytest.raises(error, match=match):
        encode_batch(**{**BASE_CALL, name: value}, backend=backend)


@needs_cpp
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rows": np.array([0, 7, 1])}, r"rows\[1\]=7 is outside \[0, 3\)"),
        ({"ends": np.array([3, 9, 1])}, r"ends\[1\]=9 is outside \[1, 5\]"),
        ({"offsets": np.array([0, 3, 80, 9])}, r"offsets\[1:3\]=\[3, 80\].*inside the 9 events"),
        ({"offsets": np.array([0, 5, 3, 9])}, r"offsets\[1:3\]=\[5, 3\]"),
        ({"offsets": np.array([-4, 3, 8, 9])}, r"offsets\[0:2\]=\[-4, 3\]"),
        ({"items": ITEMS[:5], "timestamps": TIMES[:5]}, r"offsets\[1:3\]=\[3, 8\]"),
        ({"timestamps": TIMES[:4]}, r"timestamps has 4 entries, items has 9"),
        ({"items": ITEMS[None]}, r"items must be 1-D, got 2 dimensions"),
        ({"max_len": 0}, r"max_len must be >= 1"),
        ({"num_negatives": 1, "num_items": 1}, r"num_items must be >= 2 to sample negatives"),
        ({"num_threads": 0}, r"num_threads must be >= 1"),
        ({"ignore_index": 5}, r"ignore_index must not be an item id in \[1, 5\], got 5"),
        ({"max_len": 2**62, "num_negatives": 4}, r"max_len=4611686018427387904, .* do not fit"),
    ],
)
def test_cpp_direct_call_checks_what_it_reads(change, match):
    # Called without the Python checks, the extension still never reads out of bounds.
    with pytest.raises(ValueError, match=match):
        _ext.C.encode_batch(**{**DIRECT_CALL, **change})


DIRECT_CALL = dict(offsets=OFFSETS, items=ITEMS, timestamps=TIMES, rows=np.array([0, 1, 2]),
                   ends=np.array([3, 4, 1]), target_ends=np.array([3, 4, 1]), max_len=3,
                   num_items=5, num_time_buckets=32, num_negatives=0, seed=0, pad_left=True,
                   num_threads=2)  # fmt: skip


@needs_cpp
def test_cpp_direct_call_clips_target_ends():
    """Unchecked target_ends never make the extension read outside a user's events: values past
    the user's length act as its length, values below the window as no target."""
    wild = _ext.C.encode_batch(**{**DIRECT_CALL, "target_ends": np.array([2**62, -7, 99])})
    sane = _ext.C.encode_batch(**{**DIRECT_CALL, "target_ends": np.array([3, 0, 1])})
    for a, b in zip(wild[:5], sane[:5]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rows, ends and target_ends must have equal lengths"):
        _ext.C.encode_batch(**{**DIRECT_CALL, "target_ends": np.array([1])})


# ----------------------------------------------------------------------------- backends
def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend='cuda' is not a backend; valid: auto"):
        encode_batch(**BASE_CALL, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='triton' does not apply to encode_batch"):
        encode_batch(**BASE_CALL, backend="triton")


def test_cpp_unavailable(monkeypatch):
    monkeypatch.setattr(_ext, "C", None)
    with pytest.raises(backends.BackendUnavailableError, match=r"encode_batch: backend='cpp'"):
        encode_batch(**BASE_CALL, backend="cpp")
    # auto falls back to the reference, with the same result.
    got = encode_batch(**BASE_CALL, backend="auto")
    monkeypatch.undo()
    assert_batch_equal(got, encode_batch(**BASE_CALL, backend="torch"))


def test_env_var_selects_backend(monkeypatch):
    def reference(*args):
        raise RuntimeError("the reference ran")

    monkeypatch.setattr("spnn_fast.encode.encode_batch_ref", reference)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    with pytest.raises(RuntimeError, match="the reference ran"):
        encode_batch(**BASE_CALL)


# ----------------------------------------------------------------------------- zero copy, pool
@needs_cpp
def test_outputs_are_the_extension_buffers(monkeypatch):
    seen = {}
    real = _ext.C.encode_batch

    def spy(*args):
        seen["args"], seen["out"] = args, real(*args)
        return seen["out"]

    monkeypatch.setattr(_ext.C, "encode_batch", spy)
    b = encode_batch(**BASE_CALL, num_negatives=2, backend="cpp")
    # Inputs already int64 and contiguous reach the extension as the same objects.
    assert seen["args"][1] is ITEMS and seen["args"][2] is TIMES
    for f, arr in zip(FIELDS, seen["out"]):
        t = getattr(b, f)
        # The tensor is a view of the array the extension allocated: same address, and a write
        # through the array shows in the tensor.
        assert t.data_ptr() == arr.ctypes.data, f
        assert type(arr.base).__name__ == "PyCapsule", f  # memory owned by the extension's pool
        flat = arr.reshape(-1)
        before = t.flatten()[0].item()
        flat[0] = (not flat[0]) if arr.dtype == bool else flat[0] + 1
        assert t.flatten()[0].item() != before, f


@needs_cpp
def test_pool_reuses_only_released_blocks():
    kw = dict(**BASE_CALL, num_negatives=2, backend="cpp")
    _ext.C.release_cached_buffers()
    a = encode_batch(**kw)
    keep = a.items[1:]  # a view outliving the batch keeps the block alive
    want = keep.clone()
    ptr_a = a.items.data_ptr()
    del a
    b = encode_batch(**kw)
    assert b.items.data_ptr() != ptr_a  # the block is still referenced by `keep`
    b.items.fill_(-1)
    assert torch.equal(keep, want)
    ptr_b = b.items.data_ptr()
    del b
    assert _ext.C.cached_buffers()[0] == 1
    c = encode_batch(**kw)
    assert c.items.data_ptr() == ptr_b  # a released block of the same size is reused
    assert_batch_equal(c, encode_batch(**{**kw, "backend": "torch"}))  # and fully rewritten
    del keep, c
    assert release_cached_buffers() > 0
    assert _ext.C.cached_buffers() == (0, 0)


@needs_cpp
def test_gil_released_while_encoding(monkeypatch):
    # While the extension runs, another Python thread must be able to run: count its steps
    # between the start and the end of each extension call (0 for all calls if the GIL is held).
    real = _ext.C.encode_batch
    ticks, during = [0], []

    def spy(*args):
        before = ticks[0]
        out = real(*args)
        during.append(ticks[0] - before)
        return out

    monkeypatch.setattr(_ext.C, "encode_batch", spy)
    rng = np.random.default_rng(6)
    offsets, items, times, lengths = _random_log(rng, 400, 400, 1000)
    rows, ends = _random_rows(rng, lengths, 2048)
    done = threading.Event()

    def work():
        try:
            for _ in range(5):
                encode_batch(offsets, items, times, rows, ends, 200, num_items=1000,
                             num_negatives=8, num_threads=1, backend="cpp")  # fmt: skip
        finally:
            done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks[0] += 1
    worker.join()
    assert len(during) == 5 and max(during) > 0, during


# ----------------------------------------------------------------------------- conveniences
def test_sequence_batch_to_and_fields():
    b = encode_batch(**BASE_CALL, num_negatives=1, backend="torch")
    moved = b.to("cpu", non_blocking=True)
    assert isinstance(moved, SequenceBatch) and moved.batch_size == 3 and moved.max_len == 3
    assert_batch_equal(moved, b)
    assert b.to(torch.device("cpu")).negatives is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_sequence_batch_pin_memory():  # pragma: no cover - GPU machines
    b = encode_batch(**BASE_CALL, backend="auto").pin_memory()
    assert all(getattr(b, f).is_pinned() for f in FIELDS[:5])


def _collate(samples, log, max_len):
    rows = np.array([s[0] for s in samples])
    ends = np.array([s[1] for s in samples])
    return encode_batch(*log, rows, ends, max_len, num_items=50, num_negatives=2, seed=9)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_collate(workers):
    rng = np.random.default_rng(4)
    offsets, items, times, lengths = _random_log(rng, 30, 20, 50)
    rows, ends = _random_rows(rng, lengths, 40)
    samples = list(zip(rows.tolist(), ends.tolist()))
    collate = functools.partial(_collate, log=(offsets, items, times), max_len=8)
    loader = torch.utils.data.DataLoader(samples, batch_size=16, collate_fn=collate,
                                         num_workers=workers)  # fmt: skip
    got = list(loader)
    assert [g.batch_size for g in got] == [16, 16, 8]
    for i, g in enumerate(got):
        assert isinstance(g, SequenceBatch)
        assert_batch_equal(g, collate(samples[16 * i : 16 * (i + 1)]), f"batch {i}: ")


def test_cut_takes_a_zero_dim_tensor_as_one_int():
    b = _hand([0, 1, 2], [3, 5, 1], 4, "torch", target_ends=[3, 5, 1])
    assert_batch_equal(b.cut(torch.tensor(2)), b.cut(2))
