"""One training epoch of the main job's distilled student, on a log shaped like ml-100k.

The distilled student (``student_kd``) needs its frozen teacher's outputs on every window it
trains on. One group holds:
  * ``spnn_fast[cached_teacher]``  the default: the teacher's outputs over every training window are
                                   computed once (``TrainConfig.teacher_cache_mb``) and gathered per
                                   batch; the timed epoch includes building them, as a student's
                                   first epoch does
  * ``teacher_every_batch``        the baseline: the teacher runs on each batch
                                   (``teacher_cache_mb=0``), as a plain distillation loop does
  * ``no_teacher``                 the same student without distillation (plain CE): the floor

Two groups: the student's first epoch (the cached path builds its cache inside the timed epoch)
and a later one (the second; the first runs untimed in the round's setup). A job trains each
student for 10-30 epochs. Each round uses fresh trainers built from the same seeds. Shapes are
the main job's defaults (teacher d=64, 2 layers; student d=24, 1 layer; 30-event windows at
stride 10, batches of 256, genre and user features) on a synthetic log of 943 users, 1,682 items
and about 100,000 events; the time depends on the shapes, not on the data. Smoke mode
(``--benchmark-disable``): 60 users, 2,000 events.
"""

from __future__ import annotations

import dataclasses

import _common
import numpy as np
import pytest
import torch
from _common import record

from spnn_fast.config import ExperimentConfig
from spnn_fast.data import Dataset
from spnn_fast.log import InteractionLog
from spnn_fast.model import SPNN
from spnn_fast.train import Trainer


def _dataset(users: int, items: int, events: int) -> Dataset:
    rng = np.random.default_rng(0)
    lengths = np.maximum(rng.geometric(1.0 / (events / users - 19), users) + 19, 20)
    lengths = np.round(lengths * events / lengths.sum()).astype(np.int64).clip(20)
    user = np.repeat(np.arange(users), lengths)
    item = rng.integers(1, items + 1, len(user))
    time = np.concatenate([np.sort(rng.integers(0, 10**8, n)) for n in lengths])
    log = InteractionLog(user, item, time)
    items = log.num_items  # the ids the log holds, remapped to 1..items
    genre = np.sort(rng.integers(0, 20, (items + 1, 6)), axis=1)
    genre[:, :3] = 0  # up to 3 genres per item, 0 = padding
    genre[0] = 0
    users_feat = {name: rng.integers(1, vocab, users) for name, vocab in
                  (("age", 8), ("gender", 3), ("occupation", 22))}  # fmt: skip
    return Dataset(
        "synthetic",
        log,
        item_features={"genre": genre},
        user_features=users_feat,
        feature_vocab={"genre": 20, "age": 8, "gender": 3, "occupation": 22},
    )


@pytest.fixture(scope="module")
def workload():
    ds = _dataset(60, 300, 2_000) if _common.SMOKE else _dataset(943, 1_682, 100_000)
    cfg = ExperimentConfig(device=str(_common.device()))
    mcfgs, tcfgs = cfg.model_configs(ds), cfg.train_configs()
    torch.manual_seed(0)
    teacher = SPNN(mcfgs["teacher"], ds.item_features, ds.user_features)
    return ds, mcfgs, tcfgs, teacher


IMPLS = {
    "spnn_fast[cached_teacher]": ("student_kd", None),
    "teacher_every_batch": ("student_kd", 0.0),
    "no_teacher": ("student", None),
}


@pytest.mark.parametrize("epoch", [0, 1], ids=["first_epoch", "later_epoch"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_student_kd_epoch(benchmark, workload, impl, epoch):
    benchmark.group = f"student_kd {'first' if epoch == 0 else 'later'} epoch, ml-100k shapes"
    ds, mcfgs, tcfgs, teacher = workload
    name, cache_mb = IMPLS[impl]
    tcfg = tcfgs[name]
    if cache_mb is not None:
        tcfg = dataclasses.replace(tcfg, teacher_cache_mb=cache_mb)
    dev = _common.device()

    windows = []

    def setup():
        torch.manual_seed(1)
        student = SPNN(mcfgs[name], ds.item_features, ds.user_features)
        kd = teacher if name == "student_kd" else None
        trainer = Trainer(student, ds, tcfg, teacher=kd, seed=0, device=dev)
        windows.append(len(trainer.windows[0]))
        if epoch == 1:
            trainer.train_epoch(0)
        return (trainer,), {}

    def timed(trainer):
        loss = trainer.train_epoch(epoch)
        _common.sync(dev)
        return loss

    loss = benchmark.pedantic(timed, setup=setup, rounds=1 if _common.SMOKE else 3)
    assert np.isfinite(loss)
    record(benchmark, impl=impl, windows=windows[-1], events=ds.log.num_events,
           device=str(dev), smoke=_common.SMOKE)  # fmt: skip
