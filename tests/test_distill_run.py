"""spnn-fast distill: one model trained from a finished run's teachers (their ensemble, its seed's
teacher, or none), in the run folder beside the run's models, under the run folder's guarantees;
and the script that measures it over widths (experiments/distill_widths.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_runfolder import _ENV, _damage, _hashes, _hold, _one_line_error
from test_train import _experiment_module, _tiny_experiment, _write_cycle_csv

from spnn_fast import _io
from spnn_fast.cli import main
from spnn_fast.distill_run import SPLITS, distill
from spnn_fast.experiment import ENSEMBLE, run
from spnn_fast.train import Trainer


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of two seeds whose student_kd learns from the ensemble of its teachers
    (teacher d=16, 1 layer, 2 heads; students d=4, 1 layer, 1 head; 2 epochs)."""
    root = tmp_path_factory.mktemp("distill")
    data = _write_cycle_csv(root / "cycle.csv")
    run(_tiny_experiment(data, seeds=2, kd_teacher="ensemble"), str(root / "run"), log=_quiet)
    return root / "run"


@pytest.fixture()
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same_state(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- the models
def test_a_model_of_the_students_shape_is_the_runs_own(run_dir):
    """Trained as the run's student_kd but for its shape and teachers: at the students' shape,
    from the ensemble, it is the run's student_kd to the last bit; without teachers, its
    student."""
    report = distill(str(run_dir), width=4, layers=1, heads=1, seed=1, log=_quiet)
    assert report["model"] == "distill_d4_l1_h1_all" and report["teacher_seeds"] == [0, 1]
    own = run_dir / "seed1" / "distill_d4_l1_h1_all"
    assert _same_state(own / "best.pt", run_dir / "seed1" / "student_kd" / "best.pt")
    assert (
        _json(own / "result.json")["metrics"]
        == _json(run_dir / "seed1" / "student_kd" / "result.json")["metrics"]
    )
    report = distill(str(run_dir), width=4, layers=1, heads=1, seed=1, teachers="none",
                     log=_quiet)  # fmt: skip
    assert report["model"] == "plain_d4_l1_h1" and report["teacher_seeds"] == []
    assert _same_state(run_dir / "seed1" / "plain_d4_l1_h1" / "best.pt",
                       run_dir / "seed1" / "student" / "best.pt")  # fmt: skip


@pytest.mark.parametrize("teachers", ["all", "seed", "none"])
def test_the_trainer_learns_from_the_teachers_asked_for(run_dir, monkeypatch, teachers):
    """The objective's logit term holds every seed's teacher (all), the seed's (seed) or none;
    the feature term pairs the model's last layer with the seed's teacher's last layer, whatever
    the width."""
    trainers = []

    class Stop(Exception):
        pass

    def fit(self, *a, **k):
        trainers.append(self)
        raise Stop

    monkeypatch.setattr(Trainer, "fit", fit)
    with pytest.raises(Stop):
        distill(str(run_dir), width=8, layers=2, heads=2, seed=1, teachers=teachers, log=_quiet)
    (tr,) = trainers
    assert tr.model.config.d_model == 8 and tr.model.config.n_layers == 2
    assert tr.model.config.n_heads == 2 and tr.seed == 1
    obj = tr.objective
    if teachers == "none":
        assert obj.teacher is None and obj.logit_teachers == [] and tr.teacher is None
        assert len(obj.distillers) == 0 and tr.tcfg.cut_prob == 0.5  # the run's student's
        return
    on_disk = [_state(run_dir / f"seed{s}" / "teacher" / "best.pt") for s in (0, 1)]

    def is_teacher(net, s):
        return all(torch.equal(v, on_disk[s][k]) for k, v in net.state_dict().items())

    want = [0, 1] if teachers == "all" else [1]
    assert len(obj.logit_teachers) == len(want)
    assert all(is_teacher(t, s) for t, s in zip(obj.logit_teachers, want))
    assert tr.teacher.teachers == obj.logit_teachers  # every one runs on each step's windows
    assert is_teacher(obj.teacher, 1) and obj.teacher is obj.logit_teachers[tr.teacher.own]
    assert list(obj.distillers) == ["layers_1->layers_0"]
    assert tr.tcfg.alpha > 0 and tr.tcfg.feature_weight > 0 and tr.tcfg.ensemble == "distributions"


def test_the_report_puts_the_model_next_to_the_teacher_and_the_ensemble(run_dir, tmp_path):
    report = distill(str(run_dir), seed=1, log=_quiet)  # default shape: the teacher's
    name = "distill_d16_l1_h1_all"
    assert report["model"] == name and set(report["rows"]) == {name, "teacher", ENSEMBLE}
    rows = report["rows"]
    own, teacher = run_dir / "seed1" / name, run_dir / "seed1" / "teacher"
    assert (rows[name]["d_model"], rows[name]["n_layers"], rows[name]["n_heads"]) == (16, 1, 1)
    assert rows[name]["role"] == "distilled" and rows[name]["seeds"] == [1]
    for key in ("metrics", "standard_errors", "params", "train_seconds"):
        assert rows[name][key] == _json(own / "result.json")[key]
        assert rows["teacher"][key] == _json(teacher / "result.json")[key]
    assert set(rows[name]["metrics"]) == set(SPLITS) == set(rows[name]["standard_errors"])
    ens = _json(run_dir / "ensemble" / "result.json")  # the run's row, reused
    taught = [_json(run_dir / f"seed{s}" / "teacher" / "result.json") for s in (0, 1)]
    assert rows[ENSEMBLE]["metrics"] == ens["metrics"]
    assert rows[ENSEMBLE]["params"] == sum(t["params"] for t in taught)
    assert rows[ENSEMBLE]["train_seconds"] == sum(t["train_seconds"] for t in taught)
    assert _json(own / "report.json") == json.loads(json.dumps(report))
    md = (own / "report.md").read_text()
    assert all(f"| {r} | " in md for r in rows) and f"- {name} / {ENSEMBLE}: NDCG@10" in md
    # --out: the report elsewhere; the model, reused, stays in the run
    out = tmp_path / "reports"
    distill(str(run_dir), seed=1, out=str(out), log=_quiet)
    assert _json(out / "report.json")["rows"] == _json(own / "report.json")["rows"]
    # without the run's ensemble row it is evaluated as the run evaluates it
    (run_dir / "ensemble" / "result.json").unlink()
    again = distill(str(run_dir), seed=1, log=_quiet)
    assert again["rows"][ENSEMBLE]["metrics"] == ens["metrics"]


def test_recommend_and_eval_find_a_distilled_model_by_name(run_dir, capsys):
    assert main(["distill", str(run_dir), "--seed", "1", "--teachers", "seed"]) == 0
    name = "distill_d16_l1_h1_seed"
    best = run_dir / "seed1" / name / "best.pt"
    capsys.readouterr()
    assert main(["recommend", str(run_dir), "--model", name, "--seed", "1", "--k", "2",
                 "--include-seen"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "user,rank,item,score" and len(lines) == 1 + 6 * 2
    assert main(["eval", str(best), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test"] == _json(best.parent / "result.json")["metrics"]["test"]
    assert main(["recommend", str(run_dir), "--model", name, "--seed", "0"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"seed1/{name}" in line and "does not exist" in line
    assert main(["recommend", str(run_dir), "--model", "tutor"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--model 'tutor' is not one of teacher, student, student_kd, {name}" in line
    # the run goes on as before: its own models reused, the distilled one left alone
    before = _hashes(best.parent)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "already done" in capsys.readouterr().out and _hashes(best.parent) == before


# ---------------------------------------------------------------------------- the run folder
def test_the_same_command_reuses_its_model_and_a_name_means_one_model(run_dir, capsys,
                                                                      monkeypatch):  # fmt: skip
    argv = ["distill", str(run_dir), "--width", "8", "--seed", "0"]
    assert main(argv) == 0
    folder = run_dir / "seed0" / "distill_d8_l1_h1_all"

    def model_files():  # the report is written again (its wall time), the model is not
        return {k: v for k, v in _hashes(folder).items() if not k.startswith("report.")}

    before = model_files()
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "already done, reusing its result" in capsys.readouterr().out
    assert model_files() == before
    for other, differ in ((["--heads", "2"], "n_heads differ"),
                          (["--teachers", "seed"], "teachers, teacher_files differ")):  # fmt: skip
        assert main([*argv, *other, "--name", folder.name]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"{folder} holds the model '{folder.name}', distilled with other settings" in line
        assert differ in line and "choose another --name" in line
    assert model_files() == before
    # a teacher trained again since: the model is not reused under its name
    monkeypatch.undo()
    ck = torch.load(run_dir / "seed1" / "teacher" / "best.pt", weights_only=True)
    ck["state_dict"]["item_emb.weight"][1, 0] += 1.0
    torch.save(ck, run_dir / "seed1" / "teacher" / "best.pt")
    assert main(argv) == 2
    assert "the run's teachers have changed since" in _one_line_error(capsys.readouterr().err)


def test_an_interrupted_distill_resumes_to_the_uninterrupted_model(finished, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    folders = {k: tmp_path / k for k in ("whole", "cut")}
    for f in folders.values():
        shutil.copytree(finished, f)
    name, flags = "distill_d8_l2_h2_all", ["--width", "8", "--layers", "2", "--heads", "2"]
    assert main(["distill", str(folders["whole"]), *flags]) == 0
    original = Trainer.train_epoch

    def dying(self, epoch):
        if self.desc.endswith(name) and epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    capsys.readouterr()
    assert main(["distill", str(folders["cut"]), *flags]) == 130
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("spnn-fast: ")]
    assert said == ["spnn-fast: interrupted; run the same command again to go on (its finished "
                    "epochs are kept)"]  # fmt: skip
    cut = folders["cut"] / "seed0" / name
    assert sorted(p.name for p in cut.iterdir()) == ["distill.json", "last.pt"]
    monkeypatch.undo()
    assert main(["distill", str(folders["cut"]), *flags]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    whole = folders["whole"] / "seed0" / name
    assert _same_state(cut / "best.pt", whole / "best.pt")
    assert _json(cut / "result.json")["metrics"] == _json(whole / "result.json")["metrics"]


def test_a_busy_run_folder_is_named_or_waited_for(run_dir, capsys):
    holder = _hold(run_dir)
    try:
        before = _hashes(run_dir)
        assert main(["distill", str(run_dir), "--width", "8"]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"the run folder {run_dir} is in use by process {holder.pid} on host " in line
        assert line.endswith("wait for it with --wait") and _hashes(run_dir) == before
        waiting = subprocess.Popen(
            [sys.executable, "-m", "spnn_fast", "distill", str(run_dir), "--width", "8", "--wait"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV,
        )  # fmt: skip
        first = waiting.stdout.readline()
        assert f"is in use by process {holder.pid}" in first and "waiting until it is free" in first
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stderr[-3000:]
    assert (run_dir / "seed0" / "distill_d8_l1_h1_all" / "report.md").is_file()


def test_changed_data_are_refused_unless_allowed(run_dir, tmp_path, capsys):
    # the run's data, copied where this test may change them
    data = tmp_path / "cycle.csv"
    saved = _json(run_dir / "run.json")
    shutil.copy(saved["data"]["source"], data)
    saved["config"]["dataset"] = saved["data"]["source"] = str(data)
    (run_dir / "run.json").write_text(json.dumps(saved))
    data.write_text(data.read_text() + "u0,3,99999\n")
    before = _hashes(run_dir)
    assert main(["distill", str(run_dir), "--width", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{data} is not the data {run_dir} was trained on" in line
    assert "--allow-changed-data" in line and _hashes(run_dir) == before
    assert main(["distill", str(run_dir), "--width", "8", "--allow-changed-data"]) == 0
    assert "going on (--allow-changed-data)" in capsys.readouterr().out
    # the data as the run had them again: the model made from the changed data is not reused
    data.write_text(data.read_text().replace("u0,3,99999\n", ""))
    best = run_dir / "seed0" / "distill_d8_l1_h1_all" / "best.pt"
    assert main(["distill", str(run_dir), "--width", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{data} is not the data {best} was trained on" in line, line
    assert main(["distill", str(run_dir), "--width", "8", "--allow-changed-data"]) == 0


def test_a_finished_model_without_its_checkpoint_is_not_reused(run_dir, capsys):
    assert main(["distill", str(run_dir), "--width", "8"]) == 0
    folder = run_dir / "seed0" / "distill_d8_l1_h1_all"
    (folder / "best.pt").unlink()
    capsys.readouterr()
    assert main(["distill", str(run_dir), "--width", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{folder}/best.pt is missing although" in line and f"delete {folder}" in line, line


def test_a_model_the_disk_cannot_hold_is_refused_before_training(run_dir, capsys, monkeypatch):
    import spnn_fast.experiment as experiment  # the disk check distill shares with train

    monkeypatch.setattr(experiment.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(
        10**9, 10**9 - 1000, 1000))  # fmt: skip
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    before = _hashes(run_dir)
    assert main(["distill", str(run_dir), "--width", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "checkpoints into" in line and "0.0 MiB free" in line, line
    assert _hashes(run_dir) == before


def test_a_model_too_large_for_the_machine_is_counted_not_built(run_dir, capsys):
    # 12.9 billion parameters: refused by the memory check at once (counted on the meta device)
    assert main(["distill", str(run_dir), "--width", "4096", "--layers", "64", "--heads", "1",
                 "--threads", "1"]) == 2  # fmt: skip
    assert "parameters" in _one_line_error(capsys.readouterr().err)


_DAMAGED = ["seed1/teacher/best.pt", "seed0/teacher/result.json", "ensemble/result.json",
            "seed0/distill_d8_l1_h1_all/distill.json",
            "seed0/distill_d8_l1_h1_all/best.pt"]  # fmt: skip


@pytest.mark.parametrize("damaged", _DAMAGED)
def test_a_damaged_file_is_named_with_its_recovery(run_dir, capsys, damaged):
    if "distill_d8" in damaged:  # the model's own file, damaged after it was made
        assert main(["distill", str(run_dir), "--width", "8"]) == 0
    _damage(run_dir / damaged, "truncated")
    before = _hashes(run_dir)
    capsys.readouterr()
    assert main(["distill", str(run_dir), "--width", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    recovery = {
        "best.pt": "delete it (and its result.json) to train that model again",
        "result.json": "delete it to evaluate that model again",
        "distill.json": f"delete the folder {run_dir / damaged.rsplit('/', 1)[0]} to distil",
    }[damaged.rsplit("/", 1)[1]]
    assert str(run_dir / damaged) in line and recovery in line, line
    assert _hashes(run_dir) == before


def _unfinished(run_dir):
    (run_dir / "seed1" / "student_kd" / "result.json").unlink()


def _other_run(run_dir):
    other = run_dir.parent / "other"
    (other / "seed0").mkdir(parents=True)
    shutil.copy(run_dir / "run.json", other / "run.json")


def _one_seed(run_dir):
    saved = _json(run_dir / "run.json")
    saved["config"].update(seeds=1, kd_teacher="seed")
    (run_dir / "run.json").write_text(json.dumps(saved))


_BAD = [
    (None, ["--width", "5", "--heads", "2"], "--width 5 must be a multiple of --heads 2: each"),
    (None, ["--heads", "3"], "--width 16 (the teacher's, the default) must be a multiple of "
     "--heads 3"),
    (None, ["--width", "0"], "--width must be an integer in [1, 4096] (default: the teacher's "
     "width), got 0"),
    (None, ["--layers", "65"], "--layers must be an integer in [1, 64]"),
    (None, ["--seed", "2"], "--seed 2: the run in {run} has seeds 0..1"),
    (None, ["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (None, ["--name", "teacher"], "--name teacher is taken by the run's own models"),
    (None, ["--name", "a/b"], "--name 'a/b' must be a folder name"),
    (None, ["--out", "{run}"], "--out {run} would write over {run}/report.json, a file of the run"),
    (None, ["--out", "{run}/run.json"], "--out {run}/run.json is a file: name a folder"),
    (None, ["--out", "{run}/run.json/sub"], "--out {run}/run.json/sub: cannot make that folder"),
    (_other_run, ["--out", "{run}/../other/seed0"], "is in the run folder"),
    (_unfinished, [], "{run} is not a finished run: {run}/seed1/student_kd/result.json is "
     "missing; finish it with spnn-fast train --resume {run}"),
    (_one_seed, [], "--teachers all distils from the ensemble of the run's teachers, one per "
     "seed: the run in {run} has one seed (use --teachers seed)"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "argv", "message"), _BAD, ids=[m[:40] for *_, m in _BAD])
def test_bad_arguments_are_refused_before_anything_is_written(run_dir, capsys, setup, argv,
                                                              message):  # fmt: skip
    if setup is not None:
        setup(run_dir)
    before = _hashes(run_dir)
    argv = [a.format(run=run_dir) for a in argv]
    assert main(["distill", str(run_dir), *argv]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert message.format(run=run_dir) in line, line
    assert _hashes(run_dir) == before


def test_a_one_seed_run_distils_from_its_teacher_without_an_ensemble_row(run_dir):
    _one_seed(run_dir)
    report = distill(str(run_dir), width=8, teachers="seed", log=_quiet)
    assert set(report["rows"]) == {"distill_d8_l1_h1_seed", "teacher"}
    assert report["teacher_seeds"] == [0] and report["ensemble"] is None


def test_a_folder_that_holds_no_run_is_refused(tmp_path):
    for folder, what in ((tmp_path, "a folder without run.json"), (tmp_path / "no", "no such")):
        with pytest.raises(ValueError, match=f"RUN {folder}: {what}"):
            distill(str(folder), log=_quiet)
    assert not (tmp_path / "no").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="--teachers must be one of all, seed, none, got 'many'"):
        distill(str(tmp_path), teachers="many")


def test_the_checkpoint_files_are_written_atomically(run_dir, monkeypatch):
    """A distilled model's files go through the run folder's atomic writes."""
    written = []
    real = _io.atomic_write

    def spy(path, write, **kw):
        written.append(os.path.relpath(path, run_dir))
        return real(path, write, **kw)

    import spnn_fast.distill_report
    import spnn_fast.runfolder
    import spnn_fast.train

    for module in (spnn_fast.train, spnn_fast.runfolder, spnn_fast.distill_report, _io):
        monkeypatch.setattr(module, "atomic_write", spy)
    distill(str(run_dir), width=8, log=_quiet)
    own = os.path.join("seed0", "distill_d8_l1_h1_all")
    for f in ("distill.json", "last.pt", "best.pt", "result.json", "report.json", "report.md"):
        assert os.path.join(own, f) in written, f


# ---------------------------------------------------------------------------- the measurement
def test_the_width_measurement_distils_pairs_and_reports(run_dir, tmp_path, capsys, monkeypatch):
    script = _experiment_module("distill_widths")
    out = tmp_path / "widths.jsonl"
    script.main([str(run_dir), "--widths", "8", "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["model"], r["seed"] if r["seed"] is not None else -1) for r in rows) == [
        ("distilled", 0), ("distilled", 1), ("ensemble", -1), ("plain", 0), ("plain", 1),
        ("teacher", 0), ("teacher", 1)]  # fmt: skip
    for r in rows:
        if r["model"] in ("distilled", "plain"):
            name = "distill_d8_l1_h1_all" if r["model"] == "distilled" else "plain_d8_l1_h1"
            res = _json(run_dir / f"seed{r['seed']}" / name / "result.json")
            assert (r["width"], r["layers"], r["heads"]) == (8, 1, 1)
            assert r["cold@5_NDCG@10"] == res["metrics"]["cold@5"]["NDCG@10"]
            assert r["test_HR@10"] == res["metrics"]["test"]["HR@10"]
            assert (r["params"], r["train_seconds"]) == (res["params"], res["train_seconds"])
    printed = capsys.readouterr().out
    summary = script.summary(rows)
    assert len(summary) == len(SPLITS) * 2 and f"7 rows: {out}" in printed
    (s,) = [x for x in summary if (x["split"], x["metric"]) == ("test", "NDCG@10")]
    by = {(r["model"], r["seed"]): r["test_NDCG@10"] for r in rows}
    diffs = [by["distilled", k] - by["plain", k] for k in (0, 1)]
    assert s["diff"] == pytest.approx(sum(diffs) / 2)
    assert s["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    ratios = [by["distilled", k] / by["teacher", k] for k in (0, 1)]
    assert s["over_teacher"] == pytest.approx(sum(ratios) / 2)
    assert "width   8 test" in printed
    # run again: every model is done, nothing trains, the same rows
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    script.main([str(run_dir), "--widths", "8", "--out", str(out)])
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows
