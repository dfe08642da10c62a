import numpy as np
import pytest

from spnn_fast.log import InteractionLog
from spnn_fast.protocol import (
    DEFAULT_SPLITS,
    EvalSet,
    eval_sets,
    leave_one_out,
    train_ends,
    train_log,
    train_samples,
)


@pytest.fixture
def log():
    # User "a": 6 events given out of order; "b": 3 events with a time tie (input order kept);
    # "c": 4 events. Raw items are remapped in sorted order: 10->1, 20->2, ..., 90->9.
    users = ["a", "b", "a", "c", "a", "b", "c", "a", "c", "a", "b", "a", "c"]
    items = [30, 70, 10, 90, 20, 80, 10, 40, 60, 50, 10, 60, 30]
    times = [3, 5, 1, 1, 2, 5, 2, 4, 3, 5, 7, 6, 4]
    return InteractionLog(users, items, times)


def test_fixture_layout(log):
    # a: 10 20 30 40 50 60 | b: 70 80 10 | c: 90 10 60 30
    np.testing.assert_array_equal(log.offsets, [0, 6, 9, 13])
    np.testing.assert_array_equal(log.items, [1, 2, 3, 4, 5, 6, 7, 8, 1, 9, 1, 6, 3])


def test_leave_one_out_exact(log):
    split = leave_one_out(log)
    np.testing.assert_array_equal(split.train_ends, [4, 1, 2])
    np.testing.assert_array_equal(split.valid.rows, [0, 1, 2])
    np.testing.assert_array_equal(split.valid.ends, [4, 1, 2])
    np.testing.assert_array_equal(split.valid.targets, [5, 8, 6])
    np.testing.assert_array_equal(split.test.rows, [0, 1, 2])
    np.testing.assert_array_equal(split.test.ends, [5, 2, 3])
    np.testing.assert_array_equal(split.test.targets, [6, 1, 3])
    assert split.valid.max_history is None and split.test.max_history is None
    for s in (split.valid, split.test):
        assert s.rows.dtype == s.ends.dtype == s.targets.dtype == np.int64
        np.testing.assert_array_equal(s.starts, [0, 0, 0])


def test_eval_sets_cold_cuts(log):
    sets = eval_sets(log)
    assert tuple(sets) == DEFAULT_SPLITS
    for name, k in (("cold@3", 3), ("cold@5", 5), ("cold@10", 10)):
        s = sets[name]
        assert s.max_history == k
        np.testing.assert_array_equal(s.rows, sets["test"].rows)
        np.testing.assert_array_equal(s.ends, sets["test"].ends)
        np.testing.assert_array_equal(s.targets, sets["test"].targets)
    # Test ends are [5, 2, 3]: cold@3 keeps positions [2, 5), [0, 2), [0, 3).
    np.testing.assert_array_equal(sets["cold@3"].starts, [2, 0, 0])
    np.testing.assert_array_equal(sets["cold@5"].starts, [0, 0, 0])
    np.testing.assert_array_equal(eval_sets(log, ["cold@1"])["cold@1"].starts, [4, 1, 2])
    np.testing.assert_array_equal(eval_sets(log, "valid")["valid"].ends, [4, 1, 2])


def test_train_parts(log):
    np.testing.assert_array_equal(train_ends(log), [4, 1, 2])
    t = train_log(log)
    t.validate()
    np.testing.assert_array_equal(t.offsets, [0, 4, 5, 7])
    np.testing.assert_array_equal(t.items, [1, 2, 3, 4, 7, 9, 1])
    np.testing.assert_array_equal(t.timestamps, [1, 2, 3, 4, 5, 1, 2])
    assert t.num_items == log.num_items and t.num_users == log.num_users
    s = train_samples(log)
    # a: targets at positions 1..3; b (3 events): none; c: position 1.
    np.testing.assert_array_equal(s.rows, [0, 0, 0, 2])
    np.testing.assert_array_equal(s.ends, [1, 2, 3, 1])
    np.testing.assert_array_equal(s.targets, [2, 3, 4, 1])
    assert train_samples(log, max_history=2).max_history == 2


def test_no_leakage_random():
    rng = np.random.default_rng(0)
    n_users = 40
    lengths = rng.integers(3, 30, n_users)
    users = np.repeat(np.arange(n_users), lengths)
    log = InteractionLog(users, rng.integers(0, 50, len(users)), rng.integers(0, 20, len(users)))
    n = log.lengths
    sets = eval_sets(log, ("valid", "test", "cold@3"))
    samples = train_samples(log)
    ends = train_ends(log)
    assert np.all(sets["valid"].ends == n - 2) and np.all(sets["test"].ends == n - 1)
    assert np.all(sets["cold@3"].ends - sets["cold@3"].starts == np.minimum(3, n - 1))
    # training targets and inputs stay inside [0, n-2): the validation target is never seen.
    assert np.all(samples.ends + 1 <= ends[samples.rows])
    assert np.all((ends >= 1) & (ends <= n - 2))
    assert len(samples) == int((n - 3).sum())
    for s in (*sets.values(), samples):
        np.testing.assert_array_equal(s.targets, log.items[log.offsets[s.rows] + s.ends])


def test_short_users_rejected():
    log = InteractionLog([1, 1, 1, 2, 2], [1, 2, 3, 4, 5], [0, 1, 2, 0, 1])
    for fn in (leave_one_out, train_ends, train_log, train_samples, eval_sets):
        with pytest.raises(ValueError, match="needs >= 3 events.*1 users.*raw id 2"):
            fn(log)


def test_bad_split_names(log):
    for name in ("cold@0", "cold@x", "cold", "train", 3):
        with pytest.raises(ValueError, match="unknown split"):
            eval_sets(log, [name])
    with pytest.raises(TypeError, match="InteractionLog"):
        leave_one_out(np.zeros(3))


def test_evalset_checks():
    a = np.arange(3, dtype=np.int64)
    with pytest.raises(TypeError, match="int64"):
        EvalSet(a.astype(np.int32), a, a)
    with pytest.raises(ValueError, match="one length"):
        EvalSet(a, a[:2], a)
    with pytest.raises(ValueError, match="max_history"):
        EvalSet(a, a, a, 0)
    assert len(EvalSet(a, a, a, 2)) == 3
