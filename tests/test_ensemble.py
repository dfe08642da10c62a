"""Distillation from the ensemble of a run's teachers: the settings, the trainer, the pipeline
(its report row for the ensemble, resume, torchrun) and the ensemble's evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import _tiny_experiment, _tiny_model, _write_cycle_csv

from spnn_fast.config import ExperimentConfig, TrainConfig
from spnn_fast.data import load
from spnn_fast.evaluation import evaluate
from spnn_fast.experiment import ENSEMBLE, MODELS, run
from spnn_fast.protocol import eval_sets
from spnn_fast.train import Trainer


def test_an_ensemble_needs_two_teachers_and_its_settings_are_checked():
    with pytest.raises(ValueError, match=r"kd_teacher='ensemble' .* needs seeds >= 2, got seeds=1"):
        ExperimentConfig(kd_teacher="ensemble", seeds=1)
    with pytest.raises(ValueError, match="kd_teacher='crowd' must be one of seed, ensemble"):
        ExperimentConfig(kd_teacher="crowd")
    with pytest.raises(ValueError, match="ensemble='mean' must be one of distributions, logits"):
        ExperimentConfig(kd_ensemble="mean")
    cfg = ExperimentConfig(kd_teacher="ensemble", kd_ensemble="logits", seeds=3)
    assert cfg.train_configs()["student_kd"].ensemble == "logits"
    # More seeds make another ensemble: a run folder of an ensemble run does not take them.
    assert cfg.differences(dataclasses.replace(cfg, seeds=4)) == ["seeds"]
    plain = ExperimentConfig(seeds=3)
    assert plain.differences(dataclasses.replace(plain, seeds=4)) == []
    # How an ensemble combines is no setting of a run that distils from one teacher.
    assert plain.differences(dataclasses.replace(plain, kd_ensemble="logits")) == []


@pytest.fixture()
def cycle_ds(tmp_path):
    return load(_write_cycle_csv(tmp_path / "cycle.csv"))


def _teachers(ds, n=2):
    out = []
    for seed in range(n):
        torch.manual_seed(10 + seed)
        out.append(_tiny_model(ds, max_len=8, detector_layers=["layers.0"]))
    return out


@pytest.mark.parametrize("ensemble", ["distributions", "logits"])
def test_the_ensemble_trains_the_same_from_its_cache_as_per_batch(cycle_ds, ensemble):
    """Every teacher's outputs are cached once; the student trains as when every teacher runs
    on every batch, and the feature term still reads the student's own teacher."""
    teachers = _teachers(cycle_ds)
    runs = {}
    for cache_mb in (0, 1024):
        torch.manual_seed(0)
        student = _tiny_model(cycle_ds, dropout=0.1)
        tcfg = TrainConfig(epochs=1, batch_size=4, cut_prob=0.5, cut_max=3, window_stride=4,
                           layer_pairs=[("layers.0", "layers.0")], feature_weight=1.0,
                           teacher_cache_mb=cache_mb, ensemble=ensemble)  # fmt: skip
        tr = Trainer(student, cycle_ds, tcfg, teacher=teachers[1], ensemble=teachers, seed=0)
        assert tr.teacher.own == 1 and tr.objective.logit_teachers == teachers
        loss = tr.train_epoch(0)
        runs[cache_mb] = (loss, [p.detach().clone() for p in student.parameters()])
        if cache_mb:
            assert len(tr.teacher.cache().hiddens) == 2
    assert runs[1024][0] == pytest.approx(runs[0][0], rel=1e-6)
    for a, b in zip(runs[1024][1], runs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # An ensemble that lacks the teacher the distillers read is refused.
    with pytest.raises(ValueError, match="ensemble must hold the teacher"):
        Trainer(_tiny_model(cycle_ds), cycle_ds, TrainConfig(), teacher=_teachers(cycle_ds)[0],
                ensemble=teachers)  # fmt: skip


def test_the_ensemble_of_the_same_model_ranks_as_the_model(cycle_ds):
    torch.manual_seed(0)
    model = _tiny_model(cycle_ds)
    for split, es in eval_sets(cycle_ds.log).items():
        alone = evaluate(model, cycle_ds.log, es)
        assert evaluate([model], cycle_ds.log, es, ensemble="logits") == alone, split
        twice = evaluate([model, model], cycle_ds.log, es, ensemble="distributions")
        assert twice == pytest.approx(alone, abs=1e-12), split


def test_the_pipeline_distils_from_the_ensemble_and_reports_it(tmp_path, monkeypatch):
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    cfg = _tiny_experiment(data, seeds=2, kd_teacher="ensemble")
    full = run(cfg, str(tmp_path / "full"), log=lambda *a: None)
    assert set(full["models"]) == {*MODELS, ENSEMBLE}
    ens = full["models"][ENSEMBLE]
    assert set(ens["metrics"]) == {"all", "cold@3", "cold@5", "cold@10"}
    assert ens["params"] == 2 * full["models"]["teacher"]["params"]
    saved = json.loads((tmp_path / "full" / "ensemble" / "result.json").read_text())
    assert saved["ensemble"] == "distributions" and saved["temperature"] == cfg.temperature
    assert "teacher_ensemble / student, cold@5" in (tmp_path / "full" / "report.md").read_text()

    # A distilled student killed in its second epoch resumes to the uninterrupted result.
    original = Trainer.train_epoch

    def dying(self, epoch):
        if self.desc.endswith("student_kd") and epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, str(tmp_path / "cut"), log=lambda *a: None)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = run(cfg, str(tmp_path / "cut"), log=lambda *a: None)
    for name in (*MODELS, ENSEMBLE):
        assert resumed["models"][name]["metrics"] == full["models"][name]["metrics"], name
    with pytest.raises(ValueError, match=r"\(seeds differ\)"):  # another ensemble
        run(dataclasses.replace(cfg, seeds=3), str(tmp_path / "full"), log=lambda *a: None)


def test_an_ensemble_run_under_torchrun(tmp_path):
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "spnn_fast", "train", "--data", data, "--out", str(out), "--seeds", "2",
           "--epochs", "2", "--max-len", "8", "--teacher-d", "16", "--teacher-layers", "1",
           "--student-d", "4", "--batch-size", "8", "--threads", "1", "--window-stride", "3",
           "--kd-teacher", "ensemble", "--kd-ensemble", "logits"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {*MODELS, ENSEMBLE}
    assert 0.0 <= report["models"][ENSEMBLE]["metrics"]["all"]["NDCG@10"]["mean"] <= 1.0
