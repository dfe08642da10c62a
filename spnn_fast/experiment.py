"""The main job: teacher, student and distilled student on a dataset, over seeds, with a report.

For each seed: a wide teacher SPNN trained on full histories (with a knowledge detector on its
last layer), a small student (at most 1/4 of the teacher's parameters) trained on cold-start-like
inputs without distillation, and the same student trained on the same inputs with CE + logit KD +
feature distillation from the teacher, which sees the full history. Each model is selected on
validation NDCG@10 and tested on all users and on cold@k. The run folder's files are described
in :mod:`spnn_fast.runfolder`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from spnn_fast._io import DamagedFileError, check_path_arg, file_sha256
from spnn_fast.config import STUDENT_MAX_D, ExperimentConfig, num_parameters
from spnn_fast.data import Dataset, load
from spnn_fast.distributed import world
from spnn_fast.evaluation import evaluate
from spnn_fast.fingerprint import (
    absolute_dataset,
    check_same_data,
    data_fingerprint,
    is_fingerprint,
)
from spnn_fast.model import SPNN
from spnn_fast.runfolder import (
    agree,
    check_same_run,
    check_trainer_state,
    claim,
    has_models,
    load_checkpoint,
    model_dir,
    read_result,
    read_run_data,
    read_run_threads,
    save_checkpoint,
    write_json,
    write_run_config,
)
from spnn_fast.train import _STATE_KEYS, Trainer

__all__ = [
    "METRICS",
    "MODELS",
    "REPORT_SPLITS",
    "build_report",
    "check_sizes",
    "checkpoint_data",
    "evaluate_checkpoint",
    "run",
    "seed_model",
]

MODELS = ("teacher", "student", "student_kd")
REPORT_SPLITS = {"all": "test", "cold@3": "cold@3", "cold@5": "cold@5", "cold@10": "cold@10"}
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20))
_GIB = float(1 << 30)


def seed_model(seed: int, name: str) -> None:
    """Seed the initialisation of model ``name`` (one of MODELS) for run seed ``seed``.

    Initialisation only; shuffles, cuts and dropout are seeded per epoch by the Trainer.
    """
    torch.manual_seed(seed * 1000 + MODELS.index(name))


def _check_done(out_dir: str, data: Dict, allow_changed: bool, log) -> None:
    """A finished model's best.pt, before its result is reused: there, readable, and trained on
    ``data`` (a warning instead with ``allow_changed``)."""
    best = os.path.join(out_dir, "best.pt")
    if not os.path.isfile(best):
        raise DamagedFileError(f"{best} is missing although {out_dir}/result.json says the model "
                               f"is done; delete {out_dir} to train that model again")  # fmt: skip
    _, ck = load_checkpoint(best)
    check_same_data(ck.get("data"), data, best, allow_changed=allow_changed, log=log)


def _train_one(name, seed, ds, cfg, mcfg, tcfg, run_dir, teacher, data, log,
               ensemble=None, init=None, allow_changed=False) -> Dict:  # fmt: skip
    """Train model ``name`` of seed ``seed`` into its folder (resumed from its last.pt, or its
    result reused when it has one, its best.pt checked); ``init``: the model of MODELS whose
    initialisation it takes (default ``name``; a model distilled later takes a student's);
    ``allow_changed``: reuse a model trained on other data than ``data`` with a warning."""
    out_dir = model_dir(run_dir, seed, name)
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        result = read_result(result_path, tuple(REPORT_SPLITS.values()), METRICS)
        _check_done(out_dir, data, allow_changed, log)
        log(f"[seed {seed}] {name}: already done, reusing its result")
        return result
    seed_model(seed, init or name)
    model = SPNN(mcfg, ds.item_features, ds.user_features)
    trainer = Trainer(model, ds, tcfg, teacher=teacher, ensemble=ensemble, seed=seed,
                      device=cfg.device, progress=True, desc=f"[seed {seed}] {name}")  # fmt: skip
    last = os.path.join(out_dir, "last.pt")
    if os.path.exists(last):
        check_trainer_state(last, _STATE_KEYS, trainer.objective, trainer.optimizer, seed)
    result = trainer.fit(out_dir, log=log)
    rank, size = world()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(model, os.path.join(out_dir, "best.pt"), name=name, seed=seed,
                        dataset=cfg.dataset, data=data, time_unit=cfg.time_unit)  # fmt: skip
        write_json(result, result_path)
    if size > 1:  # the other ranks read best.pt next (the teacher of student_kd)
        torch.distributed.barrier()
    return result


def check_sizes(cfg: ExperimentConfig, ds: Dataset) -> Dict[str, int]:
    """The parameters of each model on ``ds``; ValueError unless the student has at most 1/4 of
    the teacher's."""
    mcfgs = cfg.model_configs(ds)
    sizes = {n: num_parameters(m, ds) for n, m in mcfgs.items()}
    if sizes["student"] * 4 > sizes["teacher"]:
        raise ValueError(
            f"the student has {sizes['student']:,} parameters, more than 1/4 of the teacher's "
            f"{sizes['teacher']:,}: lower student_d / student_layers or widen the teacher"
        )
    return sizes


def _device_memory(device: str) -> Optional[int]:
    """Bytes of memory of ``device`` (None where it cannot be told)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(cfg: ExperimentConfig, ds: Dataset, sizes: Dict[str, int]) -> None:
    """ValueError when a model cannot fit in the device's memory: what it needs at the least
    (its parameters with their gradients and AdamW's two moments, and one layer's attention
    probabilities per layer for a batch, kept for the backward pass) exceeds all of it."""
    total = _device_memory(cfg.device)
    if total is None:
        return
    batch = -(-cfg.batch_size // world()[1])  # windows per rank
    for name, m in cfg.model_configs(ds).items():
        scores = batch * m.n_heads * m.max_len**2 * m.n_layers
        need = 4 * (4 * sizes[name] + scores)
        if need > total:
            raise ValueError(
                f"the {name} needs at least {need / _GIB:.1f} GiB on {cfg.device} (4 copies of "
                f"its {sizes[name]:,} parameters, and {batch} windows x {m.n_heads} heads x "
                f"{m.max_len}^2 attention scores x {m.n_layers} layers), more than its "
                f"{total / _GIB:.1f} GiB: lower batch_size, max_len or the model's size"
            )


def check_free_space(cfg: ExperimentConfig, sizes: Dict[str, int], run_dir: str) -> None:
    """OSError (ENOSPC) when ``run_dir``'s disk lacks the room for the checkpoints the run has
    still to write: per model a best.pt (its parameters) and a last.pt (parameters, AdamW's
    moments and the best state), plus a temporary copy while a file is replaced."""
    todo = [sizes[n] for seed in range(cfg.seeds) for n in MODELS
            if not os.path.exists(os.path.join(model_dir(run_dir, seed, n), "result.json"))]  # fmt: skip
    check_room("the run", todo, run_dir)


def check_room(who: str, todo: List[int], folder: str) -> None:
    """OSError (ENOSPC) when the disk of ``folder`` (or of its nearest existing parent) lacks the
    room for the checkpoints of models of ``todo`` parameters: per model a best.pt (its
    parameters) and a last.pt (parameters, AdamW's moments and the best state), plus a temporary
    copy while a file is replaced, in float32; ``who`` names the writer in the message."""
    if not todo:
        return
    need = sum(4 * 5 * p for p in todo) + 4 * 4 * max(todo)
    where = os.path.abspath(folder)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{who} writes about {need / 2**20:,.1f} MiB of "
                      f"checkpoints into {folder}, whose disk has {free / 2**20:,.1f} MiB free")  # fmt: skip


def _prepare(cfg: ExperimentConfig, run_dir: str, allow_changed_data: bool,
             log: Callable) -> Tuple[Dataset, Dict, ExperimentConfig, Dict]:  # fmt: skip
    """The checks of a run that need its data, in the claimed folder, before run.json is
    written: (data set, its fingerprint, the config with its sizes chosen, the run.json
    extras)."""
    ds = load(cfg.dataset, time_unit=cfg.time_unit)
    log(f"data: {ds}")
    data = data_fingerprint(cfg.dataset)
    sized = cfg.for_data(ds)
    chosen = {}
    if cfg.student_d is None:
        chosen["student_d"] = sized.student_d
        log(f"student_d: {sized.student_d} (the largest multiple of student_heads <= "
            f"{STUDENT_MAX_D} that keeps a student at most 1/4 of the teacher on these data)")  # fmt: skip
    sizes = check_sizes(sized, ds)
    check_memory(sized, ds, sizes)
    extras = {"data": data, "chosen": chosen or None, "threads": torch.get_num_threads()}
    # A folder whose run.json no model was trained under yet takes the new settings: a run that
    # failed at its first step can be corrected in place.
    if has_models(run_dir) and os.path.exists(os.path.join(run_dir, "run.json")):
        check_same_run(cfg, run_dir, ds)
        # the run keeps the thread count it began with (run.json says what a resume uses)
        extras["threads"] = read_run_threads(run_dir) or extras["threads"]
        before, earlier = read_run_data(run_dir)
        check_same_data(before, data, run_dir, allow_changed=allow_changed_data, log=log)
        if before is not None and before["files"] != data["files"]:  # allowed: keep a trace
            earlier = [*earlier, before]
        extras["earlier_data"] = earlier
    elif has_models(run_dir):
        log(f"warning: {run_dir} holds models but no run.json: they are reused unchecked")
    if world()[0] == 0:
        check_free_space(sized, sizes, run_dir)
    return ds, data, sized, extras


def run(cfg: ExperimentConfig, run_dir: str, *, log=print, wait: bool = False,
        allow_changed_data: bool = False) -> Dict:  # fmt: skip
    """Run (or resume) the whole pipeline into ``run_dir`` and write the report there.

    Every setting is checked before ``run.json`` is written: the backend against the device, the
    folder claimed for this process (:func:`~spnn_fast.runfolder.claim`; ``wait``: wait for
    another process that owns it), the data read and fingerprinted, the student's width chosen
    where it is None, the sizes against the 1/4 rule, the device's memory and the disk, and a
    folder that holds models of other settings, or of other data (unless
    ``allow_changed_data``), refused. A path of data is recorded absolute.
    """
    agree(cfg.check_backend)
    cfg = dataclasses.replace(cfg, dataset=absolute_dataset(cfg.dataset))
    rank, _ = world()
    with claim(run_dir, wait=wait, log=log):
        t0 = time.perf_counter()
        ds, data, sized, extras = agree(lambda: _prepare(cfg, run_dir, allow_changed_data, log))
        if rank == 0:
            write_run_config(cfg, run_dir, **extras)
        results = _train_all(cfg, sized, ds, run_dir, data, log, allow_changed_data)
        report = build_report(cfg, ds, results, time.perf_counter() - t0)
        report["chosen"], report["data"] = extras["chosen"] or {}, data
        report["earlier_data"] = extras.get("earlier_data") or []
        if rank == 0:
            from spnn_fast.report import write_report

            write_report(report, run_dir)
    return report


def _train_all(cfg, sized, ds, run_dir, data, log, allow_changed=False) -> Dict[str, List[Dict]]:
    """Every model of every seed (all the teachers first: a distilled student may learn from
    their ensemble), then, with two seeds or more, the teachers' ensemble evaluated."""
    mcfgs, tcfgs = sized.model_configs(ds), sized.train_configs()
    results: Dict[str, List[Dict]] = {m: [] for m in MODELS}
    teachers = []
    for name in MODELS:
        for seed in range(cfg.seeds):
            ensemble = teachers if name == "student_kd" and cfg.kd_teacher == "ensemble" else None
            teacher = teachers[seed] if name == "student_kd" else None
            res = _train_one(name, seed, ds, cfg, mcfgs[name], tcfgs[name], run_dir, teacher,
                             data, log, ensemble, allow_changed=allow_changed)  # fmt: skip
            results[name].append(res)
            if name == "teacher":
                path = os.path.join(model_dir(run_dir, seed, name), "best.pt")
                teachers.append(load_checkpoint(path, cfg.device)[0])
    if len(teachers) > 1:
        results[ENSEMBLE] = [_ensemble_result(cfg, ds, teachers, run_dir, log)]
    return results


# The report's name of the teachers' ensemble (evaluated, not trained).
ENSEMBLE = "teacher_ensemble"


def _ensemble_result(cfg: ExperimentConfig, ds: Dataset, teachers, run_dir: str, log) -> Dict:
    """The teachers' ensemble on every split, as ``kd_ensemble`` combines them (at the
    distillation's temperature): what an ensemble-distilled student learns from. Saved in
    ``ensemble/result.json`` and reused."""
    from spnn_fast.protocol import eval_sets

    path = os.path.join(run_dir, "ensemble", "result.json")
    # what the saved row was evaluated on: the teachers (each best.pt's hash) and how they combine
    members = [file_sha256(os.path.join(model_dir(run_dir, s, "teacher"), "best.pt"))
               for s in range(len(teachers))]  # fmt: skip
    if os.path.exists(path):
        saved = read_result(path, tuple(REPORT_SPLITS.values()), METRICS)
        now = (members, cfg.kd_ensemble, cfg.temperature)
        if (saved.get("teachers"), saved.get("ensemble"), saved.get("temperature")) == now:
            return saved
    final = {split: evaluate(teachers, ds.log, es, with_se=True, device=cfg.device,
                             ensemble=cfg.kd_ensemble, temperature=cfg.temperature)
             for split, es in eval_sets(ds.log).items()}  # fmt: skip
    result = {
        "metrics": {s: m for s, (m, _) in final.items()},
        "standard_errors": {s: se for s, (_, se) in final.items()},
        "history": [], "best_epoch": 0, "train_seconds": 0.0, "windows_per_second": 0.0,
        "params": sum(t.num_parameters() for t in teachers),
        "ensemble": cfg.kd_ensemble, "temperature": cfg.temperature, "teachers": members,
    }  # fmt: skip
    log(f"{ENSEMBLE} of {len(teachers)} teachers ({cfg.kd_ensemble}): valid NDCG@10 "
        f"{result['metrics']['valid']['NDCG@10']:.4f}")  # fmt: skip
    if world()[0] == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(result, path)
    return result


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


def checkpoint_data(path: str, ck: Dict, dataset: Optional[str] = None, *,
                    allow_changed_data: bool = False, log=print) -> Dataset:  # fmt: skip
    """The data set of a saved model (``dataset``: another path to them), loaded and checked
    against the fingerprint the checkpoint records (refused, naming both, unless
    ``allow_changed_data``) and against the model's item count."""
    if dataset is not None:
        check_path_arg("--dataset", dataset, "a data set")
    source = dataset or ck.get("dataset")
    if not isinstance(source, str):
        raise DamagedFileError(f"{path} names no data set: give --dataset")
    source = absolute_dataset(source)
    recorded = ck.get("data")
    if recorded is not None and not is_fingerprint(recorded):
        raise DamagedFileError(f"{path}: its data fingerprint is damaged; give --dataset and "
                               f"--allow-changed-data to use it anyway")  # fmt: skip
    # first: a named data set may need its download
    ds = load(source, time_unit=ck.get("time_unit"))
    check_same_data(recorded, data_fingerprint(source), path,
                    allow_changed=allow_changed_data, log=log)  # fmt: skip
    items = ck["config"]["num_items"]
    if ds.log.num_items != items:
        raise ValueError(f"{path} scores {items} items, the data set has {ds.log.num_items}")
    return ds


def evaluate_checkpoint(path: str, device: str = "cpu", dataset: Optional[str] = None, *,
                        allow_changed_data: bool = False, log=print) -> Dict:  # fmt: skip
    """Metrics of a saved model on every split of its data set (see :func:`checkpoint_data`)."""
    from spnn_fast.protocol import eval_sets

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "best.pt")):
        path = os.path.join(path, "best.pt")  # a model's folder names its checkpoint
    model, ck = load_checkpoint(path, device)
    ds = checkpoint_data(path, ck, dataset, allow_changed_data=allow_changed_data, log=log)
    return {s: evaluate(model.to(device), ds.log, es, device=device)
            for s, es in eval_sets(ds.log).items()}  # fmt: skip
