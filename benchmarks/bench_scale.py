"""Logs of real size on one machine: loading, a teacher step (and the epoch it implies),
evaluation and recommendation over an events x items grid of synthetic logs.

The logs come from ``benchmarks/synthetic.py`` (Zipf items, log-normal users, gaps from seconds
to months), written once per session as CSV and Parquet. Shapes (events, users, items):

* ``A``: 1M, 6,040, 3,706 (MovieLens-1M's shape)
* ``B``: 1M, 6,040, 100,000
* ``C``: 5M, 30,000, 1,000,000

One group per log and measurement, the implementations a user would otherwise pick beside the
package's default in the same group:

* ``load``: ``spnn_fast.data.load`` of the CSV and of the Parquet file (pyarrow);
* ``teacher_step``: one optimizer step of the main job's teacher (batches of 256 windows of 30
  events) with ``loss="auto"`` (sampled softmax above ``SAMPLED_ABOVE`` items), ``"full"`` (the
  cross-entropy over the whole catalogue; skipped above 200,000 items, where one step takes
  minutes) and ``"sampled"`` (1,024 negatives); ``extra_info`` holds ``epoch_minutes``, the
  step's median times the steps of an epoch, and the process's peak RSS;
* ``evaluate``: the test split (full ranking of every item for every user);
* ``recommend``: the top 10 unseen items of every user (``spnn_fast.recommend.recommend_users``).

``SPNN_BENCH_SCALE`` (comma list of A, B, C) picks logs; default all. Smoke mode
(``--benchmark-disable``): one tiny log, each body once.

    pytest benchmarks/bench_scale.py --benchmark-json=out.json
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time

import _common
import numpy as np
import pytest
import synthetic
import torch
from _common import record

from spnn_fast import data
from spnn_fast.config import ExperimentConfig
from spnn_fast.model import SPNN
from spnn_fast.recommend import recommend_users
from spnn_fast.train import Trainer

LOGS = {"A": (1_000_000, 6_040, 3_706), "B": (1_000_000, 6_040, 100_000),
        "C": (5_000_000, 30_000, 1_000_000)}  # fmt: skip
SMOKE_LOG = {"tiny": (3_000, 60, 400)}
FULL_CE_MAX_ITEMS = 200_000
STEPS = 5  # timed teacher steps (after two untimed)


def _logs():
    if _common.SMOKE:
        return SMOKE_LOG
    want = os.environ.get("SPNN_BENCH_SCALE")
    names = [n.strip() for n in want.split(",")] if want else list(LOGS)
    return {n: LOGS[n] for n in names}


@pytest.fixture(scope="module", params=list(_logs()))
def log_files(request, tmp_path_factory):
    events, users, items = _logs()[request.param]
    folder = tmp_path_factory.mktemp(f"scale_{request.param}")
    cols = synthetic.generate(events, users, items, seed=0)
    synthetic.write_csv(cols, folder / "log.csv")
    synthetic.write_parquet(cols, folder / "log.parquet")
    return request.param, folder


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_load(benchmark, log_files, fmt):
    name, folder = log_files
    benchmark.group = f"scale {name}: load"
    path = str(folder / f"log.{fmt}")
    ds = benchmark.pedantic(data.load, args=(path,), rounds=1 if _common.SMOKE else 3)
    assert ds.log.num_events > 0
    record(benchmark, impl=f"spnn_fast[{fmt}]", events=ds.log.num_events,
           items=ds.log.num_items, maxrss_gb=_maxrss_gb())  # fmt: skip


@pytest.fixture(scope="module")
def dataset(log_files):
    name, folder = log_files
    return name, str(folder / "log.parquet"), data.load(str(folder / "log.parquet"))


def _teacher(ds, path, loss):
    cfg = ExperimentConfig(dataset=path, loss=loss)
    torch.manual_seed(0)
    model = SPNN(cfg.model_configs(ds)["teacher"], ds.item_features, ds.user_features)
    return model, dataclasses.replace(cfg.train_configs()["teacher"])


@pytest.mark.parametrize("loss", ["auto", "full", "sampled"])
def test_teacher_step(benchmark, dataset, loss):
    name, path, ds = dataset
    benchmark.group = f"scale {name}: teacher step"
    if loss == "full" and ds.log.num_items > FULL_CE_MAX_ITEMS:
        pytest.skip(f"full cross-entropy over {ds.log.num_items:,} items: minutes per step")
    model, tcfg = _teacher(ds, path, loss)
    trainer = Trainer(model, ds, tcfg, seed=0)
    model.train()
    batches = iter(trainer._batches(0))
    steps = 1 if _common.SMOKE else STEPS
    times = []

    def step():
        idx, keep = next(batches)
        t0 = time.perf_counter()
        stats = trainer.step(idx, keep)
        times.append(time.perf_counter() - t0)
        return stats

    if not _common.SMOKE:
        step(), step()  # warm
        times.clear()
    stats = benchmark.pedantic(step, rounds=steps)
    assert np.isfinite(stats["loss"])
    per_epoch = -(-len(trainer.windows[0]) // tcfg.batch_size)
    record(benchmark, impl=f"spnn_fast[loss={loss}]", loss_used=trainer.loss_note,
           steps_per_epoch=per_epoch, windows=len(trainer.windows[0]),
           epoch_minutes=statistics.median(times) * per_epoch / 60, maxrss_gb=_maxrss_gb())  # fmt: skip


def test_evaluate(benchmark, dataset):
    name, path, ds = dataset
    benchmark.group = f"scale {name}: evaluate"
    model, tcfg = _teacher(ds, path, "auto")
    trainer = Trainer(model, ds, tcfg, seed=0)
    metrics = benchmark.pedantic(trainer.evaluate, args=("test",), rounds=1)
    assert 0.0 <= metrics["NDCG@10"] <= 1.0
    record(benchmark, impl="spnn_fast", users=ds.log.num_users, items=ds.log.num_items,
           maxrss_gb=_maxrss_gb())  # fmt: skip


def test_recommend(benchmark, dataset):
    name, path, ds = dataset
    benchmark.group = f"scale {name}: recommend"
    model, _ = _teacher(ds, path, "auto")
    model.eval()
    rows = np.arange(ds.log.num_users)

    def run():
        with torch.no_grad():
            return sum(len(part) for part, _ in recommend_users(model, ds.log, rows, 10))

    served = benchmark.pedantic(run, rounds=1)
    assert served == ds.log.num_users
    record(benchmark, impl="spnn_fast", users=ds.log.num_users, items=ds.log.num_items,
           maxrss_gb=_maxrss_gb())  # fmt: skip
