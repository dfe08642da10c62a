"""Recommendations (spnn_fast.recommend) from a tiny run trained here: the model-level function
against the full scores, and the command's output in raw ids."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _tiny_experiment

from spnn_fast import recommend as R
from spnn_fast.data import load
from spnn_fast.encode import SequenceBatch, encode_batch
from spnn_fast.experiment import MODELS, run
from spnn_fast.model import SPNN, SPNNConfig, window_items
from spnn_fast.reference.topk import full_scores
from spnn_fast.runfolder import load_checkpoint

USERS, ITEMS, EVENTS = 9, 25, 8


def _write_shop_csv(path):
    """Users ``c0``..``c8`` each meet 8 of 25 items whose raw ids (1000, 1007, ...) are not the
    remapped ones; most items stay unseen by each user."""
    rows = ["user,item,timestamp"]
    for u in range(USERS):
        for t in range(EVENTS):
            rows.append(f"c{u},{1000 + 7 * ((3 * u + 2 * t) % ITEMS)},{500 * u + 60 * t}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recommend")
    data = _write_shop_csv(folder / "shop.csv")
    run_dir = folder / "run"
    run(_tiny_experiment(data, epochs=1, max_len=5), str(run_dir), log=lambda *a: None)
    return {"data": data, "run": str(run_dir), "ds": load(data), "folder": folder}


def _reference_topk(model, hidden, seen_rows, k):
    """Full scores, each row's seen items at -inf, a stable descending sort, the first k."""
    scores = full_scores(hidden, model.item_emb.weight.detach()).float()
    for b, seen in enumerate(seen_rows):
        scores[b, list(seen)] = float("-inf")
    values, items = torch.sort(scores, dim=1, descending=True, stable=True)
    values, items = values[:, :k], items[:, :k]
    return items.masked_fill(values == float("-inf"), 0), values


def _hidden(model, batch):
    with torch.no_grad():
        out = model(batch.items, batch.timestamps, batch.time_buckets, batch.mask, batch.users)
    return out.hidden[:, -1]


def _histories(log, rows):
    return [set(log.items[log.offsets[u] : log.offsets[u + 1]].tolist()) for u in rows]


# --- the model-level function -------------------------------------------------------------------


def test_recommend_excludes_the_window_or_the_given_history(trained):
    model, _ = load_checkpoint(f"{trained['run']}/seed0/student_kd/best.pt")
    log = trained["ds"].log
    rows = np.arange(log.num_users)
    batch = R.user_batch(log, rows, model.config.max_len, model.config.num_time_buckets)
    # The window is the whole history's last max_len events: it ends at the user's last event.
    last = log.items[log.offsets[rows + 1] - 1]
    assert torch.equal(batch.items[:, -1], torch.from_numpy(last))
    assert bool(batch.mask.sum(1).eq(model.config.max_len).all())
    hidden = _hidden(model.eval(), batch)
    windows = [set(r[m].tolist()) for r, m in zip(batch.items, batch.mask)]
    k = 12
    got = model.recommend(batch, k)
    want = _reference_topk(model, hidden, windows, k)
    assert torch.equal(got.items, want[0]) and torch.equal(got.scores, want[1])
    # The whole history is longer than the window: its older items are left out too.
    history = _histories(log, rows)
    assert any(h - w for h, w in zip(history, windows))
    got = model.recommend(batch, k, seen=R.history_items(log, rows))
    want = _reference_topk(model, hidden, history, k)
    assert torch.equal(got.items, want[0]) and torch.equal(got.scores, want[1])
    # Nothing left out: the plain top-k, seen items included.
    got = model.recommend(batch, k, exclude_seen=False)
    want = _reference_topk(model, hidden, [set()] * len(rows), k)
    assert torch.equal(got.items, want[0]) and torch.equal(got.scores, want[1])
    assert any(set(got.items[b].tolist()) & windows[b] for b in range(len(rows)))


def test_recommend_keeps_the_models_mode_and_fills_missing_slots(trained):
    model, _ = load_checkpoint(f"{trained['run']}/seed0/teacher/best.pt")
    log = trained["ds"].log
    rows = np.array([0, 4])
    batch = R.user_batch(log, rows, model.config.max_len, model.config.num_time_buckets)
    model.train()
    v = log.num_items
    got = model.recommend(batch, v, seen=R.history_items(log, rows))
    assert model.training  # restored after the eval-mode forward
    for b, seen in enumerate(_histories(log, rows)):
        unseen = v - len(seen)
        assert set(got.items[b, :unseen].tolist()) == set(range(1, v + 1)) - seen
        assert torch.all(got.items[b, unseen:] == 0)
        assert torch.all(got.scores[b, unseen:] == float("-inf"))


def test_window_items_is_the_masked_items():
    items = torch.tensor([[0, 0, 5, 2], [1, 3, 3, 7], [0, 0, 0, 4]])
    batch = argparse.Namespace(items=items, mask=items > 0)
    offsets, ids = window_items(batch)
    assert offsets.tolist() == [0, 2, 6, 7]
    assert ids.tolist() == [5, 2, 1, 3, 3, 7, 4]


def _tiny_model():
    """V = 10 items, 8 time buckets, a user feature over 3 users."""
    cfg = SPNNConfig(num_items=10, max_len=4, d_model=8, n_layers=1, num_time_buckets=8,
                     user_feature_vocab={"age": 4})  # fmt: skip
    return SPNN(cfg, user_features={"age": np.array([1, 2, 3])})


def _batch(items, time_buckets=None, users=None):
    items = torch.tensor(items)
    zeros = torch.zeros_like(items)
    buckets = zeros if time_buckets is None else torch.tensor(time_buckets)
    users = None if users is None else torch.tensor(users)
    return SequenceBatch(items=items, timestamps=zeros, time_buckets=buckets, mask=items > 0,
                         targets=zeros, users=users)  # fmt: skip


@pytest.mark.parametrize(
    "batch, match",
    [
        (_batch([[0, 3, 11], [1, 2, 3]]),
         r"batch.items holds 11 \(row 0\), outside the model's \[0, V\] .* = \[0, 10\]"),
        (_batch([[0, 3, 4], [1, -2, 3]]), r"batch.items holds -2 \(row 1\).*V\] \(items 1..V, 0 = padding\) = \[0, 10\]"),
        (_batch([[0, 3, 4]], time_buckets=[[0, 2, 8]]),
         r"batch.time_buckets holds 8 \(row 0\), outside the model's \[0, num_time_buckets - 1\] = \[0, 7\]"),
        (_batch([[0, 3, 4], [1, 2, 3]], users=[2, 3]),
         r"batch.users holds 3 \(row 1\), outside the model's \[-1, U - 1\] \(-1 = unseen\) = \[-1, 2\]"),
    ],
)  # fmt: skip
def test_recommend_names_an_id_the_model_does_not_hold(batch, match):
    """An id beyond the model's tables (e.g. a log with items the model was not trained on) is a
    ValueError naming the batch's field, the value and the bound, not a bare IndexError."""
    with pytest.raises(ValueError, match=match):
        _tiny_model().recommend(batch, 3)


def test_recommend_of_a_log_with_more_items_than_the_model():
    offsets, items = np.array([0, 4, 8]), np.array([1, 5, 12, 2, 3, 4, 9, 10])
    batch = encode_batch(offsets, items, np.arange(8) * 60, np.array([0, 1]), np.array([4, 4]), 4,
                         num_items=12)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"batch.items holds 12 \(row 0\), outside the model's \[0, V\]"
    ):
        _tiny_model().recommend(batch, 3)
    fine = _tiny_model().recommend(_batch([[0, 3, 10], [1, 2, 3]], users=[-1, 2]), 3)
    assert fine.items.shape == (2, 3) and bool((fine.items > 0).all())


# --- the command ---------------------------------------------------------------------------------


def _parse(*argv):
    return R.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _read(path):
    if str(path).endswith(".csv"):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        return [(r["user"], int(r["rank"]), r["item"], float(r["score"])) for r in rows]
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [(str(r["user"]), r["rank"], str(r["item"]), r["score"]) for r in rows]


def _expected(trained, model_name, raw_users, k, include_seen):
    """(user, rank, item, score) from the full scores of the model, in raw ids."""
    ds = trained["ds"]
    log = ds.log
    model, _ = load_checkpoint(f"{trained['run']}/seed0/{model_name}/best.pt")
    index = {str(u): i for i, u in enumerate(log.user_ids)}
    rows = np.array([index[u] for u in raw_users])
    batch = R.user_batch(log, rows, model.config.max_len, model.config.num_time_buckets)
    seen = [set()] * len(rows) if include_seen else _histories(log, rows)
    items, scores = _reference_topk(model, _hidden(model.eval(), batch), seen, k)
    out = []
    for b, user in enumerate(raw_users):
        for r in range(k):
            if items[b, r] > 0:
                raw = str(log.item_ids[int(items[b, r]) - 1])
                out.append((user, r + 1, raw, float(scores[b, r])))
    return out


def _assert_rows(got, want):
    assert [g[:3] for g in got] == [w[:3] for w in want]
    # scores are written as the shortest decimal of the float32: equal as float32
    assert np.array_equal(np.float32([g[3] for g in got]), np.float32([w[3] for w in want]))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_command_writes_raw_ids_without_seen_items(trained, tmp_path, suffix):
    users = tmp_path / "users.txt"
    users.write_text("c3\n\nc0\nc8\n")  # a blank line is skipped; the file's order is kept
    out = tmp_path / f"recs{suffix}"
    assert R.main(_parse(trained["run"], "--users", str(users), "--k", "5", "--out", str(out))) == 0
    got = _read(out)
    _assert_rows(got, _expected(trained, "student_kd", ["c3", "c0", "c8"], 5, False))
    log = trained["ds"].log
    raw_items = {str(i) for i in log.item_ids}
    for user, _, item, _ in got:
        history = _histories(log, [list(map(str, log.user_ids)).index(user)])[0]
        seen_raw = {str(log.item_ids[i - 1]) for i in history}
        assert item in raw_items and item not in seen_raw


def test_command_include_seen_and_checkpoint_path(trained, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("c1\nc2\n")
    a, b = tmp_path / "run_folder.csv", tmp_path / "checkpoint.csv"
    R.main(_parse(trained["run"], "--model", "teacher", "--users", str(users), "--k", "7",
                  "--include-seen", "--out", str(a)))  # fmt: skip
    ckpt = f"{trained['run']}/seed0/teacher/best.pt"
    R.main(_parse(ckpt, "--users", str(users), "--k", "7", "--include-seen", "--out", str(b)))
    assert a.read_text() == b.read_text()
    _assert_rows(_read(a), _expected(trained, "teacher", ["c1", "c2"], 7, True))
    assert "14 rows written" in capsys.readouterr().err


def test_command_all_users_on_stdout_with_a_progress_bar(trained, capsys):
    R.main(_parse(trained["run"], "--k", "2", "--batch-size", "4"))
    out, err = capsys.readouterr()
    rows = list(csv.reader(out.splitlines()))
    assert rows[0] == ["user", "rank", "item", "score"]
    raw_users = [str(u) for u in trained["ds"].log.user_ids]
    assert [r[0] for r in rows[1:]] == [u for u in raw_users for _ in range(2)]
    assert "recommend" in err  # the bar: 9 users take three batches of 4


def test_command_errors_name_the_argument(trained, tmp_path):
    run_dir, ckpt = trained["run"], f"{trained['run']}/seed0/student/best.pt"
    v = trained["ds"].log.num_items
    (tmp_path / "users.txt").write_text("c1\nnobody\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "dir.csv").mkdir()
    cases = [
        ((str(tmp_path / "missing"),), FileNotFoundError, "no such run folder or checkpoint"),
        ((str(tmp_path),), ValueError, "without run.json"),
        ((run_dir, "--seed", "3"), FileNotFoundError, r"--seed 3: .*\(the run holds seed0/"),
        ((ckpt, "--seed", "0"), ValueError, "--model and --seed pick a checkpoint in a run"),
        ((run_dir, "--users", str(tmp_path / "nope.txt")), FileNotFoundError, "--users"),
        ((run_dir, "--users", str(tmp_path / "users.txt")), ValueError, r"\(first: nobody\)"),
        ((run_dir, "--users", str(tmp_path / "empty.txt")), ValueError, "lists no user ids"),
        ((run_dir, "--k", "0"), ValueError, "--k must be an integer >= 1"),
        ((run_dir, "--k", str(v + 1)), ValueError, rf"--k must be in \[1, V={v}\]"),
        ((run_dir, "--batch-size", "0"), ValueError, "--batch-size"),
        ((run_dir, "--out", str(tmp_path / "r.txt")), ValueError, "--out .* .csv, .jsonl"),
        ((run_dir, "--out", str(tmp_path / "no" / "r.csv")), FileNotFoundError, "--out"),
        ((run_dir, "--out", ""), ValueError, "--out must name a file, got ''"),
        ((run_dir, "--out", " "), ValueError, "--out must name a file, got ' '"),
        (
            (run_dir, "--out", str(tmp_path / "dir.csv")),
            ValueError,
            "--out .* is a folder: name a file",
        ),
        ((run_dir, "--dataset", ""), ValueError, "--dataset must name a data set, got ''"),
        ((run_dir, "--dataset", str(tmp_path / "gone.csv")), FileNotFoundError, "--dataset"),
    ]
    for argv, error, match in cases:
        with pytest.raises(error, match=match):
            R.main(_parse(*argv))
    with pytest.raises(ValueError, match="--model 'tutor' is not one of"):
        R.resolve_checkpoint(run_dir, "tutor")
    assert set(MODELS) >= {R.DEFAULT_MODEL}


# --- evaluation through target_rank ---------------------------------------------------------------


def test_target_rank_gives_the_evaluations_ranks(trained):
    """Every split of the trained run ranked as ``train.evaluate`` does today
    (``ranks_from_scores(model.score(hidden).float())``) and by ``target_rank``: the same ranks."""
    from spnn_fast.functional import target_rank
    from spnn_fast.metrics import ranks_from_scores
    from spnn_fast.protocol import eval_sets
    from spnn_fast.train import make_batch, train_ends

    log = trained["ds"].log
    for name in MODELS:
        model, _ = load_checkpoint(f"{trained['run']}/seed0/{name}/best.pt")
        model.eval()
        cfg = model.config
        for split, es in eval_sets(log).items():
            max_len = min(cfg.max_len, es.max_history or cfg.max_len)
            for s in range(0, len(es.rows), 4):  # batches of 4 rows, the last one shorter
                part = slice(s, s + 4)
                b = make_batch(log, es.rows[part], es.ends[part], max_len, cfg.num_time_buckets,
                               train_ends(log))  # fmt: skip
                hidden = _hidden(model, b)
                targets = torch.from_numpy(es.targets[part])
                want = ranks_from_scores(model.score(hidden).float(), targets)
                got = target_rank(hidden, model.item_emb.weight, targets)
                assert torch.equal(got, want), (name, split, s)


def test_recommend_refuses_data_other_than_the_models(trained, tmp_path):
    """Raw ids come from the data set: data that changed since training (another export of the
    same size, here) would map them wrongly, so they are refused unless allowed."""
    changed = tmp_path / "shop.csv"
    text = open(trained["data"]).read().replace("c0,", "c9,", 1)
    changed.write_text(text)
    best = f"{trained['run']}/seed0/student_kd/best.pt"
    with pytest.raises(ValueError, match="--allow-changed-data"):
        R.serve(best, dataset=str(changed), k=2, out=str(tmp_path / "r.csv"))
    assert not (tmp_path / "r.csv").exists()
    rows = R.serve(best, dataset=str(changed), k=2, out=str(tmp_path / "r.csv"),
                   allow_changed_data=True)  # fmt: skip
    assert rows > 0


# --- the output never replaces a file the run reads -----------------------------------------------


def _refused_outputs(trained, tmp_path):
    """(--out, RUN_OR_CHECKPOINT, extra flags) that name, one way or another, a file the run
    reads."""
    data = trained["data"]
    folder = trained["folder"]
    (tmp_path / "link.csv").symlink_to(data)
    os.link(data, tmp_path / "hard.csv")
    users = tmp_path / "users.csv"
    users.write_text("c1\n")
    run_dir = trained["run"]
    best = f"{run_dir}/seed0/teacher/best.pt"
    return [
        (data, run_dir, ()),  # the data file itself
        ("shop.csv", run_dir, ()),  # relative to the working directory (the data's folder)
        (f"{run_dir}/../shop.csv", best, ()),  # with .. in it, served from a checkpoint
        (str(tmp_path / "link.csv"), run_dir, ()),  # a symlink to it
        (str(tmp_path / "hard.csv"), run_dir, ()),  # a hard link to it
        (str(users), run_dir, ("--users", str(users))),  # the users file the command reads
        # a second .csv in a data folder: the folder would no longer name one data file
        (str(folder / "new.csv"), run_dir, ("--dataset", str(folder))),
    ]


def _tree(folder) -> dict:
    return {str(p): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_the_output_never_replaces_a_file_the_run_reads(trained, tmp_path, monkeypatch, capsys):
    from spnn_fast.cli import main

    monkeypatch.chdir(trained["folder"])
    cases = _refused_outputs(trained, tmp_path)
    before = _tree(trained["folder"]), _tree(tmp_path)
    for out, source, extra in cases:
        assert main(["recommend", source, "--k", "2", *extra, "--out", out]) == 2, out
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spnn-fast: error: --out "), err
        assert "which the run reads" in err or "data folder" in err or "--users" in err, err
        assert (_tree(trained["folder"]), _tree(tmp_path)) == before, out  # nothing written
    # A file of its own beside the data, in the run folder or anywhere else is written.
    for out in (trained["folder"] / "run" / "recs.csv", tmp_path / "recs.jsonl"):
        assert main(["recommend", trained["run"], "--k", "2", "--out", str(out)]) == 0
        assert out.stat().st_size > 0
    assert R.serve(trained["run"], k=2, out=str(out)) > 0  # written over: it is no run's file
