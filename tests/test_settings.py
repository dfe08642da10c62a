"""Every setting of the main job checked before a run folder is written (the backend on the
device, the sizes against their bounds and the machine), the students' default width chosen from
the catalogue, and the messages that say what a rule is."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from _synthetic import ML1M_ITEMS, ML1M_USERS, write_movielens
from test_train import _train_cli_config, _write_cycle_csv

import spnn_fast.experiment
from spnn_fast.cli import main
from spnn_fast.config import STUDENT_MAX_D, ExperimentConfig, TrainConfig, num_parameters
from spnn_fast.data import load
from spnn_fast.experiment import MODELS, check_sizes, run, seed_model
from spnn_fast.model import SPNN, SPNNConfig
from spnn_fast.runfolder import check_same_run
from spnn_fast.train import Trainer

_TINY = ["--seeds", "1", "--epochs", "1", "--max-len", "8", "--teacher-d", "16",
         "--teacher-layers", "1", "--student-d", "4", "--batch-size", "8", "--threads", "1"]  # fmt: skip


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("spnn-fast: error: "), err
    return err


# ---------------------------------------------------------------------------- case 3: settings
@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("bogus", "backend='bogus' must be None or one of auto, triton, torch"),
        ("cpp", "backend='cpp' must be None or one of auto, triton, torch"),
        ("triton", "backend='triton' on device='cpu': .*TRITON_INTERPRET=1 is not set"),
    ],
)
def test_a_backend_that_cannot_run_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch, backend, message
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run on this CPU
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    assert main(["train", "--data", data, "--out", str(out), *_TINY, "--backend", backend]) == 2
    assert re.search(message, _error(capsys))
    assert not out.exists()
    # The folder is not spoilt: the corrected command runs in it.
    assert main(["train", "--data", data, "--out", str(out), *_TINY, "--backend", "torch"]) == 0


def test_the_backend_variable_is_checked_like_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPNN_FAST_BACKEND", "bogus")
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    assert main(["train", "--data", data, "--out", str(tmp_path / "run"), *_TINY]) == 2
    assert "SPNN_FAST_BACKEND='bogus' is not a backend" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_settings_no_model_was_trained_under_give_way_to_corrected_ones(tmp_path, capsys):
    # A run.json whose run failed before its first epoch ended holds no model: the folder
    # takes the next settings instead of refusing them as "another configuration".
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    out.mkdir()
    stale = {"format": "spnn_fast.run/2", "config": ExperimentConfig(dataset=data).to_dict()}
    (out / "run.json").write_text(json.dumps(stale))
    assert main(["train", "--data", data, "--out", str(out), *_TINY]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["student_d"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-len", "100000000"], r"max_len=100000000 must be an integer in \[1, 4096\] "
                                     r"\(the bound spnn_fast.config.MAX_LEN\)"),
        (["--teacher-max-len", "5000"], r"teacher_max_len=5000 must be None or an integer in"),
        (["--teacher-d", "100000"], r"teacher_d=100000 must be an integer in \[1, 4096\]"),
        (["--teacher-layers", "1000"], r"teacher_layers=1000 must be an integer in \[1, 64\]"),
        (["--student-d", "0"], r"student_d=0 must be None or an integer in \[1, 4096\]"),
    ],
)  # fmt: skip
def test_sizes_beyond_their_bounds_are_refused_naming_the_bound(tmp_path, capsys, flags,
                                                                message):  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.csv"), "--out", str(out), *flags]) == 2
    assert re.search(message, _error(capsys))
    assert not out.exists()


def test_a_model_too_big_for_the_machine_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(spnn_fast.experiment, "_device_memory", lambda device: 1 << 30)
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    flags = ["--max-len", "4096", "--teacher-d", "16", "--teacher-layers", "1", "--student-d",
             "4", "--seeds", "1"]  # fmt: skip
    assert main(["train", "--data", data, "--out", str(out), *flags]) == 2
    err = _error(capsys)
    assert "the teacher needs at least 32.0 GiB on cpu (" in err
    assert (
        "256 windows x 2 heads x 4096^2 attention scores x 1 layers), more than its 1.0 GiB" in err
    )
    assert not out.exists()


# ---------------------------------------------------------------------------- case 5: catalogue
def test_the_default_student_fits_a_movielens_1m_sized_catalogue(tmp_path):
    ds = load(write_movielens(tmp_path, events=(4, 10)))
    assert (ds.log.num_items, ds.log.num_users) == (ML1M_ITEMS, ML1M_USERS)
    cfg = ExperimentConfig(dataset=str(tmp_path / "ratings.dat"), teacher_cache_mb=0)
    # The case: the width tuned on ml-100k breaks the 1/4 rule on this catalogue.
    with pytest.raises(ValueError, match="more than 1/4 of the teacher's"):
        check_sizes(dataclasses.replace(cfg, student_d=STUDENT_MAX_D), ds)
    sized = cfg.for_data(ds)
    d = sized.student_d
    assert 1 <= d < STUDENT_MAX_D
    sizes = check_sizes(sized, ds)
    assert 4 * sizes["student"] <= sizes["teacher"]
    wider = cfg.for_data(ds)._model_configs(ds, d + 1)["student"]
    assert 4 * num_parameters(wider, ds) > sizes["teacher"]  # the largest width that fits
    # One training step of each model, with the default shapes, on this catalogue.
    mcfgs, tcfgs = sized.model_configs(ds), sized.train_configs()
    models = {}
    for name in MODELS:
        seed_model(0, name)
        models[name] = SPNN(mcfgs[name], ds.item_features, ds.user_features)
        assert models[name].num_parameters() == sizes[name]  # counted without building it
        teacher = models["teacher"] if name == "student_kd" else None
        trainer = Trainer(models[name], ds, tcfgs[name], teacher=teacher)
        idx = np.arange(32)
        stats = trainer.step(idx, np.full(32, mcfgs[name].max_len))
        assert np.isfinite(stats["loss"]), name


class _FirstStep(Exception):
    """Ends a run at the first training step it takes."""


def test_the_main_job_with_defaults_gets_to_training_on_a_movielens_1m_sized_log(
    tmp_path, monkeypatch, capsys
):
    # The command as a user runs it on such a file, through every check and run.json, up to
    # the first training step (whole epochs over 6,040 users would cost minutes here).
    data = write_movielens(tmp_path / "ml-1m", events=(4, 10))
    out = tmp_path / "run"

    def first_step(self, ckpt_dir=None, *, log=print):
        idx, keep = next(self._batches(0))
        assert np.isfinite(self.step(idx, keep)["loss"])
        raise _FirstStep(self.desc)

    monkeypatch.setattr(Trainer, "fit", first_step)
    with pytest.raises(_FirstStep, match="teacher"):
        main(["train", "--data", str(data), "--out", str(out), "--seeds", "1", "--threads", "1"])
    saved = json.loads((out / "run.json").read_text())
    d = saved["chosen"]["student_d"]
    assert saved["config"]["student_d"] is None and 1 <= d < STUDENT_MAX_D
    assert f"student_d: {d} (the largest multiple of student_heads <= 24" in capsys.readouterr().out


def test_the_default_student_on_a_movielens_100k_catalogue_is_todays(tmp_path):
    # ml-100k's catalogue and feature vocabularies: the main job's models as they were.
    ds = load(write_movielens(tmp_path, users=943, items=1682, genres=19, events=(20, 24)))
    cfg = ExperimentConfig(dataset=str(tmp_path / "ratings.dat"))
    assert cfg.for_data(ds).student_d == 24
    assert check_sizes(cfg.for_data(ds), ds) == {"teacher": 222_791, "student": 51_687,
                                                 "student_kd": 51_687}  # fmt: skip


def test_the_real_ml100k_keeps_its_student_width():
    from spnn_fast.download import DatasetUnavailableError

    try:
        ds = load("ml-100k", download=False)
    except DatasetUnavailableError:
        pytest.skip("ml-100k is not in the cache (tests do not download it)")
    assert ExperimentConfig().for_data(ds).student_d == 24


def test_the_default_width_follows_a_catalogue_of_any_size():
    # A million items: only the item tables grow, so a student holds 1/4 of the teacher when
    # its width is at most 1/4 of the teacher's (64 / 4); counting builds no item table. The
    # data set stands in with what the size rule reads of it.
    log = SimpleNamespace(num_items=1_000_000)
    ds = SimpleNamespace(name="big", log=log, item_features={}, user_features={},
                         feature_vocab={})  # fmt: skip
    sized = ExperimentConfig().for_data(ds)
    assert sized.student_d == 16
    mcfgs = sized.model_configs(ds)
    assert 4 * num_parameters(mcfgs["student"], ds) <= num_parameters(mcfgs["teacher"], ds)


def test_the_chosen_width_is_recorded_and_compares_as_chosen(tmp_path):
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    cfg = ExperimentConfig(dataset=data, seeds=1, epochs=1, max_len=8, teacher_d=16,
                           teacher_layers=1, batch_size=8, student_d=None)  # fmt: skip
    report = run(cfg, str(tmp_path / "run"), log=lambda *a: None)
    d = report["chosen"]["student_d"]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["student_d"] is None and saved["chosen"] == {"student_d": d}
    assert report["config"]["student_d"] is None
    assert 4 * report["models"]["student"]["params"] <= report["models"]["teacher"]["params"]
    assert report["data"]["files"]["cycle.csv"]["bytes"] > 0
    ds = load(data)
    check_same_run(dataclasses.replace(cfg, student_d=d), str(tmp_path / "run"), ds)
    with pytest.raises(ValueError, match=r"\(student_d differ\)"):
        check_same_run(dataclasses.replace(cfg, student_d=d - 1), str(tmp_path / "run"), ds)


def test_no_default_width_fits_a_teacher_too_small():
    ds = SimpleNamespace(name="tiny", log=SimpleNamespace(num_items=7), item_features={},
                         user_features={}, feature_vocab={})  # fmt: skip
    cfg = ExperimentConfig(teacher_d=1, teacher_heads=1, teacher_layers=1)
    with pytest.raises(ValueError, match=r"no student width <= 24 \(a multiple of student_heads=1"
                                         r"\) keeps the student at most 1/4 of the teacher's"):  # fmt: skip
        cfg.for_data(ds)


# ---------------------------------------------------------------------------- case 6
def test_a_missing_time_column_names_the_keyword_time_col(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,when\nu1,1,5\n")
    with pytest.raises(ValueError, match=r"no timestamp column .* load\(\.\.\., time_col=\.\.\.\)"
                                         r", or rename it in the header") as e:  # fmt: skip
        load(path)
    assert "timestamp_col" not in str(e.value)
    with pytest.raises(ValueError, match=r"no timestamp column \(time_col='ts'\)"):
        load(path, time_col="ts")
    assert len(load(path, time_col="when", min_events=1).log.items) == 1


def test_max_len_zero_is_reported_as_max_len():
    with pytest.raises(ValueError, match=r"^max_len=0 must be an integer in \[1, 4096\]") as e:
        _train_cli_config("--max-len", "0")
    assert "teacher_max_len" not in str(e.value)


def test_a_width_heads_do_not_divide_says_why():
    with pytest.raises(ValueError, match=r"teacher_d=7 must be a multiple of teacher_heads=2: "
                                         r"each head takes teacher_d / teacher_heads dims"):  # fmt: skip
        _train_cli_config("--teacher-d", "7")
    with pytest.raises(ValueError, match=r"student_d=6 must be a multiple of student_heads=4"):
        _train_cli_config("--student-d", "6", "--student-heads", "4")


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("num_items", 0, "an integer >= 1"),
        ("max_len", 0, "an integer >= 1"),
        ("d_model", 7, r"an integer >= 1 and a multiple of n_heads=2 \(each head takes d_model / "
                       r"n_heads dims\)"),
        ("n_heads", 0, "an integer >= 1"),
        ("n_layers", 2.0, "an integer >= 1"),
        ("d_ff", 0, r"None \(4 \* d_model\) or an integer >= 1"),
        ("dropout", 1.0, r"a number in \[0, 1\)"),
        ("num_time_buckets", 65, r"an integer in \[1, 64\]"),
    ],
)  # fmt: skip
def test_spnn_config_says_the_rule_of_every_field(field, value, rule):
    kw = {"num_items": 5, field: value}
    with pytest.raises(ValueError, match=rf"SPNNConfig.{field}={value!r} must be {rule}"):
        SPNNConfig(**kw)


def test_users_with_three_events_are_said_to_have_no_training_target(tmp_path, caplog):
    rows = ["user,item,timestamp"]
    for u, n in (("a", 3), ("b", 3), ("c", 4), ("d", 9), ("e", 2)):
        rows += [f"{u},{i % 5 + 1},{i}" for i in range(n)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="spnn_fast"):
        ds = load(path)
    assert "log: 2 of 4 users have 3 or fewer events, so no training target" in caplog.text
    assert ds.log.num_users == 4  # kept, and evaluated
    # Indeed no window of theirs trains a target.
    trainer = Trainer(SPNN(SPNNConfig(num_items=ds.log.num_items, max_len=4, d_model=8,
                                      n_layers=1)), ds, TrainConfig())  # fmt: skip
    rows_with_targets = set()
    for i in range(len(trainer.windows[0])):
        rows_, ends = (a[i : i + 1] for a in trainer.windows)
        if trainer._batch(rows_, ends).targets.gt(0).any():
            rows_with_targets.add(int(rows_[0]))
    users = [ds.log.user_ids[r] for r in sorted(rows_with_targets)]
    assert users == ["c", "d"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spnn_fast"):
        load(path, min_events=4)
    assert "no training target" not in caplog.text


# ------------------------------------------------------------------- every field checked when built
_BAD_FIELDS = [
    (ExperimentConfig, {"dataset": None}, r"dataset=None must be a data set name or a path"),
    (ExperimentConfig, {"dataset": ""}, r"dataset='' must be a data set name or a path"),
    (ExperimentConfig, {"dataset": 5}, r"dataset=5 must be a data set name or a path"),
    (ExperimentConfig, {"use_side_features": "no"}, r"use_side_features='no' must be True or"),
    (ExperimentConfig, {"teacher_cut_prob": 2}, r"^teacher_cut_prob=2 must be a number in \[0, 1\]"),
    (ExperimentConfig, {"kd_teacher_input": "all"}, r"^kd_teacher_input='all' must be one of full"),
    (ExperimentConfig, {"kd_ensemble": "vote"}, r"^kd_ensemble='vote' must be one of distrib"),
    (ExperimentConfig, {"schedule": ["cosine"]}, r"schedule=\['cosine'\] must be 'constant' or"),
    (TrainConfig, {"layer_pairs": [("a",)]}, r"layer_pairs=\[\('a',\)\] must be a list of \(st"),
    (TrainConfig, {"layer_pairs": None}, r"layer_pairs=None must be a list of \(student layer"),
    (TrainConfig, {"layer_pairs": "ab"}, r"layer_pairs='ab' must be a list"),
    (TrainConfig, {"layer_pairs": [("layers.0", "bogus")]}, r"pairs of layer names \('embed' or 'layers.N'"),
    (TrainConfig, {"layer_pairs": [("layers.0", 1)]}, r"must be a list of \(student layer, tea"),
    (SPNNConfig, {"backend": "bogus"}, r"SPNNConfig.backend='bogus' must be None or one of auto"),
    (SPNNConfig, {"backend": "cpp"}, r"SPNNConfig.backend='cpp' must be None or one of auto"),
    (SPNNConfig, {"item_feature_vocab": {"genre": 0}}, r"item_feature_vocab=\{'genre': 0\} mus"),
    (SPNNConfig, {"item_feature_vocab": ["genre"]}, r"item_feature_vocab=\['genre'\] must be a"),
    (SPNNConfig, {"user_feature_vocab": {1: 3}}, r"user_feature_vocab=\{1: 3\} must be a dict"),
    (SPNNConfig, {"user_feature_vocab": None}, r"user_feature_vocab=None must be a dict"),
    (SPNNConfig, {"detector_layers": "layers.0"}, r"detector_layers='layers.0' must be a list"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "kw", "message"), _BAD_FIELDS,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in _BAD_FIELDS])  # fmt: skip
def test_a_bad_field_is_refused_when_the_config_is_built(cls, kw, message):
    base = {"num_items": 5} if cls is SPNNConfig else {}
    with pytest.raises(ValueError, match=message):
        cls(**base, **kw)


def test_numbers_of_other_types_become_plain_python_numbers(tmp_path):
    from fractions import Fraction
    from pathlib import Path

    from spnn_fast.runfolder import load_checkpoint, save_checkpoint

    cfg = ExperimentConfig(dataset=Path("data.csv"), lr=Fraction(1, 100), seeds=np.int64(2))
    assert cfg.dataset == "data.csv" and type(cfg.lr) is float and type(cfg.seeds) is int
    json.dumps(cfg.to_dict())  # run.json can hold it
    pairs = TrainConfig(layer_pairs=[["layers.0", "layers.1"]]).layer_pairs  # as JSON gives it
    assert pairs == [("layers.0", "layers.1")]
    # A model config of numpy numbers makes a checkpoint that reads back.
    mcfg = SPNNConfig(num_items=np.int64(5), d_model=np.int32(8), dropout=np.float32(0.25),
                      item_feature_vocab={"genre": np.int64(4)}, n_layers=1)  # fmt: skip
    assert type(mcfg.num_items) is int and type(mcfg.item_feature_vocab["genre"]) is int
    model = SPNN(mcfg, {"genre": np.zeros(6, dtype=np.int64)})
    save_checkpoint(model, str(tmp_path / "best.pt"), name="teacher", seed=0, dataset="x")
    assert load_checkpoint(str(tmp_path / "best.pt"))[0].config == mcfg
