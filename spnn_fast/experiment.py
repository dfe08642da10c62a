"""The main job: teacher, student and distilled student on a dataset, over seeds, with a report.

For each seed: a wide teacher SPNN trained on full histories (with a knowledge detector on its
last layer), a small student (at most 1/4 of the teacher's parameters) trained on cold-start-like
inputs without distillation, and the same student trained on the same inputs with CE + logit KD +
feature distillation from the teacher, which sees the full history. Each model is selected on
validation NDCG@10 and tested on all users and on cold@k. The run folder's files are described
in :mod:`spnn_fast.runfolder`.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from spnn_fast.config import ExperimentConfig
from spnn_fast.data import Dataset, load
from spnn_fast.distributed import world
from spnn_fast.evaluation import evaluate
from spnn_fast.model import SPNN
from spnn_fast.runfolder import (
    check_same_run,
    load_checkpoint,
    model_dir,
    read_result,
    save_checkpoint,
    write_json,
    write_run_config,
)
from spnn_fast.train import Trainer

__all__ = [
    "METRICS",
    "MODELS",
    "REPORT_SPLITS",
    "build_report",
    "evaluate_checkpoint",
    "run",
    "seed_model",
]

MODELS = ("teacher", "student", "student_kd")
REPORT_SPLITS = {"all": "test", "cold@3": "cold@3", "cold@5": "cold@5", "cold@10": "cold@10"}
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20))


def seed_model(seed: int, name: str) -> None:
    """Seed the initialisation of model ``name`` (one of MODELS) for run seed ``seed``.

    Initialisation only; shuffles, cuts and dropout are seeded per epoch by the Trainer.
    """
    torch.manual_seed(seed * 1000 + MODELS.index(name))


def _train_one(name, seed, ds, cfg, mcfg, tcfg, run_dir, teacher, log) -> Dict:
    out_dir = model_dir(run_dir, seed, name)
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        log(f"[seed {seed}] {name}: already done, reusing its result")
        return read_result(result_path)
    seed_model(seed, name)
    model = SPNN(mcfg, ds.item_features, ds.user_features)
    trainer = Trainer(model, ds, tcfg, teacher=teacher, seed=seed, device=cfg.device,
                      progress=True, desc=f"[seed {seed}] {name}")  # fmt: skip
    result = trainer.fit(out_dir, log=log)
    rank, size = world()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(model, os.path.join(out_dir, "best.pt"), name=name, seed=seed,
                        dataset=cfg.dataset)  # fmt: skip
        write_json(result, result_path)
    if size > 1:  # the other ranks read best.pt next (the teacher of student_kd)
        torch.distributed.barrier()
    return result


def check_sizes(cfg: ExperimentConfig, ds: Dataset) -> None:
    """ValueError unless the student has at most 1/4 of the teacher's parameters on ``ds``."""
    mcfgs = cfg.model_configs(ds)
    sizes = {n: SPNN(mcfgs[n], ds.item_features, ds.user_features).num_parameters()
             for n in ("teacher", "student")}  # student_kd shares the student's shape  # fmt: skip
    if sizes["student"] * 4 > sizes["teacher"]:
        raise ValueError(
            f"the student has {sizes['student']:,} parameters, more than 1/4 of the teacher's "
            f"{sizes['teacher']:,}: lower student_d / student_layers or widen the teacher"
        )


def run(cfg: ExperimentConfig, run_dir: str, *, log=print) -> Dict:
    """Run (or resume) the whole pipeline into ``run_dir`` and write the report there."""
    rank, _ = world()
    check_same_run(cfg, run_dir)
    t0 = time.perf_counter()
    ds = load(cfg.dataset)
    log(f"data: {ds}")
    check_sizes(cfg, ds)
    mcfgs, tcfgs = cfg.model_configs(ds), cfg.train_configs()
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        write_run_config(cfg, run_dir)
    results: Dict[str, List[Dict]] = {m: [] for m in MODELS}
    for seed in range(cfg.seeds):
        teacher = None
        for name in MODELS:
            res = _train_one(name, seed, ds, cfg, mcfgs[name], tcfgs[name], run_dir,
                             teacher if name == "student_kd" else None, log)  # fmt: skip
            results[name].append(res)
            if name == "teacher":
                path = os.path.join(model_dir(run_dir, seed, name), "best.pt")
                teacher, _ = load_checkpoint(path, cfg.device)
    report = build_report(cfg, ds, results, time.perf_counter() - t0)
    if rank == 0:
        from spnn_fast.report import write_report

        write_report(report, run_dir)
    return report


def _mean_std(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _metric_summary(runs: List[Dict], split: str, metric: str) -> Dict[str, float]:
    """Mean and std over seeds, and the mean over seeds of the standard error over users."""
    out = _mean_std([r["metrics"][split][metric] for r in runs])
    out["se_users"] = float(np.mean([r["standard_errors"][split][metric] for r in runs]))
    return out


def build_report(cfg: ExperimentConfig, ds: Dataset, results: Dict[str, List[Dict]],
                 wall: float) -> Dict:  # fmt: skip
    models = {}
    for name, runs in results.items():
        metrics = {
            split: {m: _metric_summary(runs, src, m) for m in METRICS}
            for split, src in REPORT_SPLITS.items()
        }
        models[name] = {
            "metrics": metrics,
            "params": int(runs[0]["params"]),
            "train_seconds": _mean_std([r["train_seconds"] for r in runs]),
            "sequences_per_second": _mean_std([r["windows_per_second"] for r in runs]),
            "best_epoch": [r["best_epoch"] for r in runs],
            "history": [r["history"] for r in runs],
        }
    return {
        "dataset": {
            "name": ds.name,
            "users": ds.log.num_users,
            "items": ds.log.num_items,
            "events": ds.log.num_events,
            "dropped_users": ds.dropped_users,
        },
        "protocol": {
            "split": "leave-one-out by time (last event test, second-last validation)",
            "ranking": "full ranking over all items, history items not masked, ties pessimistic",
            "selection": "validation NDCG@10, early stopping",
            "cold": "cold@k: same test targets, input cut to the k most recent events",
        },
        "seeds": list(range(cfg.seeds)),
        "config": cfg.to_dict(),
        "models": models,
        "wall_seconds": wall,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def evaluate_checkpoint(path: str, device: str = "cpu", dataset: Optional[str] = None) -> Dict:
    """Metrics of a saved model on every split of its dataset."""
    from spnn_fast.protocol import eval_sets

    model, ck = load_checkpoint(path, device)
    ds = load(dataset or ck["dataset"])
    if ds.log.num_items != model.config.num_items:
        raise ValueError(
            f"{path} scores {model.config.num_items} items, the dataset has {ds.log.num_items}"
        )
    return {s: evaluate(model.to(device), ds.log, es, device=device)
            for s, es in eval_sets(ds.log).items()}  # fmt: skip
