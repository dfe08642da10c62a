"""The main job: teacher, student and distilled student on a dataset, over seeds, with a report.

For each seed: a wide teacher SPNN trained on full histories (with a knowledge detector on its
last layer), a small student (at most 1/4 of the teacher's parameters) trained on cold-start-like
inputs without distillation, and the same student trained on the same inputs with CE + logit KD +
feature distillation from the teacher, which sees the full history. Each model is selected on
validation NDCG@10 and tested on all users and on cold@k. The run folder holds::

    run.json                      the configuration (what --resume reads)
    seed<S>/<model>/last.pt       trainer state after the last finished epoch (atomic)
    seed<S>/<model>/best.pt       the selected model (spnn-fast eval reads it)
    seed<S>/<model>/result.json   its metrics, history and timings
    report.json, report.md, report.png
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from spnn_fast._io import atomic_write
from spnn_fast.data import Dataset, load
from spnn_fast.model import SPNN, SPNNConfig
from spnn_fast.train import TrainConfig, Trainer, _integer, evaluate, world

__all__ = [
    "ExperimentConfig",
    "MODELS",
    "check_device",
    "REPORT_SPLITS",
    "METRICS",
    "load_checkpoint",
    "run",
    "seed_model",
]

MODELS = ("teacher", "student", "student_kd")
REPORT_SPLITS = {"all": "test", "cold@3": "cold@3", "cold@5": "cold@5", "cold@10": "cold@10"}
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20))


@dataclass
class ExperimentConfig:
    dataset: str = "ml-100k"  # a known name or a path
    seeds: int = 3
    epochs: int = 50  # a budget: early stopping (patience) ends most runs before it
    device: str = "cpu"
    # windows (and evaluation inputs) of every model: the 30 most recent events. Chosen on validation
    # NDCG@10 (benchmarks/sweep_teacher.py): teachers reading 10, 20 or 30 events beat 50 on ml-100k
    max_len: int = 30
    teacher_max_len: Optional[int] = None  # the teacher's, default max_len: it may see more
    teacher_d: int = 64
    teacher_layers: int = 2
    teacher_heads: int = 2
    student_d: int = 24
    student_layers: int = 1
    student_heads: int = 1
    dropout: float = 0.2  # the students' (and the teacher's when teacher_dropout is None)
    # The teacher's, chosen on validation NDCG@10 (benchmarks/sweep_teacher.py): 0.35 beat 0.2
    # and 0.5; the students do not gain from it. Runs saved before this field existed used
    # ``dropout`` for the teacher too (see from_saved).
    teacher_dropout: Optional[float] = 0.35
    batch_size: int = 256
    lr: float = 2e-3
    schedule: str = "constant"  # or "cosine": warmup, then decay over `epochs` (TrainConfig)
    patience: int = 5
    # Every model: a training window ends every `window_stride` events and each target of an
    # uncut window is trained once per epoch, after at least max_len - window_stride earlier
    # events (TrainConfig.window_stride); None: windows of max_len that do not overlap. Runs
    # saved before this field existed trained without overlap (see from_saved).
    window_stride: Optional[int] = 10
    cut_prob: float = 0.5  # students: share of windows cut to a short (cold-start-like) history
    teacher_cut_prob: float = 0.0  # the teacher: the same cut, as augmentation (off: full inputs)
    cut_min: int = 1
    cut_max: int = 10
    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 1.0 / 64  # the feature loss sums squares over d_knowledge = 64 dims
    # what student_kd's teacher reads: its "full" windows (privileged) or the student's "cut" input
    kd_teacher_input: str = "full"
    use_side_features: bool = True
    backend: Optional[str] = None
    # student_kd keeps its teacher's outputs on every window when they fit in this many MiB
    # (TrainConfig.teacher_cache_mb; 0: the teacher runs on every batch). Speed only: a run may
    # change it.
    teacher_cache_mb: float = 1024.0
    extra: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked before a run folder is written or a model trained; the model shapes need the
        # data set and are checked once it is loaded, before training. numpy scalars become
        # Python numbers (run.json holds them, and a rerun compares them).
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), np.generic):
                setattr(self, f.name, getattr(self, f.name).item())
        if not _integer(self.seeds, 1):
            raise ValueError(f"seeds={self.seeds!r} must be an integer >= 1")
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        t = self.teacher_dropout
        if t is not None and not (isinstance(t, numbers.Real) and 0.0 <= t < 1.0):
            raise ValueError(
                f"teacher_dropout={t!r} must be None (the same as dropout; -1 on the command "
                f"line) or a number in [0, 1)"
            )
        m = self.teacher_max_len
        if m is not None and (
            not _integer(m, 1) or (_integer(self.max_len, 1) and m < self.max_len)
        ):
            raise ValueError(
                f"teacher_max_len={m!r} must be None (= max_len) or an integer >= max_len "
                f"({self.max_len}): the teacher reads at least the student's window"
            )
        check_device(self.device)
        train_configs(self)  # every TrainConfig check (rates, distillation weights, windows)

    @classmethod
    def from_saved(cls, config: dict) -> ExperimentConfig:
        """The configuration stored in a run's ``run.json``, with the values that runs saved
        before a field existed used (``window_stride``: no overlap; ``teacher_dropout``: the
        common ``dropout``), not today's defaults."""
        return cls(**{"window_stride": None, "teacher_dropout": None, **config})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def spelled_out(self) -> ExperimentConfig:
        """This configuration with the teacher's settings whose None stands for the common one
        (``teacher_dropout``, ``teacher_max_len``) given as that value: what the models use, and
        how two ways of asking for one run compare equal."""
        return dataclasses.replace(
            self,
            teacher_dropout=self.dropout if self.teacher_dropout is None else self.teacher_dropout,
            teacher_max_len=self.teacher_max_len or self.max_len,
        )


def check_device(device: str) -> str:
    """``device`` when this machine can compute on it ("cpu", "cuda" or "cuda:N"), else a
    ValueError (TypeError for a non-string) saying why."""
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a str such as 'cpu' or 'cuda', got {type(device).__name__}"
        )
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if d.type == "cpu" and d.index not in (None, 0):
        raise ValueError(f"device={device!r}: the CPU is one device, use 'cpu'")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: spnn_fast runs on 'cpu' or 'cuda'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but no CUDA device is visible")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def model_configs(cfg: ExperimentConfig, ds: Dataset) -> Dict[str, SPNNConfig]:
    cfg = cfg.spelled_out()
    side = cfg.use_side_features
    item_vocab = {n: ds.feature_vocab[n] for n in ds.item_features} if side else {}
    user_vocab = {n: ds.feature_vocab[n] for n in ds.user_features} if side else {}
    common = dict(num_items=ds.log.num_items, item_feature_vocab=item_vocab,
                  user_feature_vocab=user_vocab, backend=cfg.backend)  # fmt: skip
    teacher = SPNNConfig(d_model=cfg.teacher_d, n_layers=cfg.teacher_layers,
                         max_len=cfg.teacher_max_len, n_heads=cfg.teacher_heads,
                         dropout=cfg.teacher_dropout,
                         detector_layers=[f"layers.{cfg.teacher_layers - 1}"], **common)  # fmt: skip
    student = SPNNConfig(d_model=cfg.student_d, n_layers=cfg.student_layers, max_len=cfg.max_len,
                         n_heads=cfg.student_heads, dropout=cfg.dropout, **common)  # fmt: skip
    return {"teacher": teacher, "student": student, "student_kd": student}


def train_configs(cfg: ExperimentConfig) -> Dict[str, TrainConfig]:
    base = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                schedule=cfg.schedule, window_stride=cfg.window_stride)  # fmt: skip
    cold = dict(cut_prob=cfg.cut_prob, cut_min=cfg.cut_min, cut_max=cfg.cut_max)
    pairs = [(f"layers.{cfg.student_layers - 1}", f"layers.{cfg.teacher_layers - 1}")]
    return {
        "teacher": TrainConfig(**base, cut_prob=cfg.teacher_cut_prob, cut_min=cfg.cut_min,
                               cut_max=cfg.cut_max),
        "student": TrainConfig(**base, **cold),
        "student_kd": TrainConfig(**base, **cold, alpha=cfg.alpha, temperature=cfg.temperature,
                                  feature_weight=cfg.feature_weight, layer_pairs=pairs,
                                  teacher_input=cfg.kd_teacher_input,
                                  teacher_cache_mb=cfg.teacher_cache_mb),
    }  # fmt: skip


def seed_model(seed: int, name: str) -> None:
    """Seed the initialisation of model ``name`` (one of MODELS) for run seed ``seed``.

    Initialisation only; shuffles, cuts and dropout are seeded per epoch by the Trainer.
    """
    torch.manual_seed(seed * 1000 + MODELS.index(name))


def _save_json(obj, path: str) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), text=True)


def _best_checkpoint(model: SPNN, ds: Dataset, cfg: ExperimentConfig, name: str, seed: int):
    return {
        "format": "spnn_fast.checkpoint/1",
        "model": name,
        "seed": seed,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "dataset": cfg.dataset,
    }


def load_checkpoint(path: str, device: str = "cpu"):
    """(model, checkpoint dict) from a ``best.pt`` written by :func:`run`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_device(device)  # a device problem is not a bad file
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path} is not an spnn_fast model checkpoint ({type(e).__name__})") from e
    if not isinstance(ck, dict) or ck.get("format") != "spnn_fast.checkpoint/1":
        raise ValueError(f"{path} is not an spnn_fast model checkpoint")
    return SPNN.from_state(SPNNConfig.from_dict(ck["config"]), ck["state_dict"]), ck


def _train_one(name, seed, ds, cfg, mcfg, tcfg, run_dir, teacher, log) -> Dict:
    out_dir = os.path.join(run_dir, f"seed{seed}", name)
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            log(f"[seed {seed}] {name}: already done, reusing its result")
            return json.load(f)
    seed_model(seed, name)
    model = SPNN(mcfg, ds.item_features, ds.user_features)
    trainer = Trainer(model, ds, tcfg, teacher=teacher, seed=seed, device=cfg.device,
                      progress=True, desc=f"[seed {seed}] {name}")  # fmt: skip
    result = trainer.fit(out_dir, log=log)
    rank, size = world()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        best = _best_checkpoint(model, ds, cfg, name, seed)
        atomic_write(os.path.join(out_dir, "best.pt"), lambda f: torch.save(best, f))
        _save_json(result, result_path)
    if size > 1:  # the other ranks read best.pt next (the teacher of student_kd)
        torch.distributed.barrier()
    return result


# What may change when a run folder is reused: the device (a run may go on elsewhere), the
# number of seeds (a run may gain seeds; the ones done are reused, see _train_one) and the
# teacher cache's budget (speed only).
_RUN_MAY_CHANGE = ("device", "seeds", "teacher_cache_mb")


def _check_same_run(cfg: ExperimentConfig, run_json: str) -> None:
    """ValueError if ``run_json`` records a run whose results ``cfg`` must not reuse."""
    if not os.path.exists(run_json):
        return
    with open(run_json) as f:
        # this run's device: the saved one need not exist here
        saved = ExperimentConfig.from_saved({**json.load(f)["config"], "device": cfg.device})
    saved, now = saved.spelled_out().to_dict(), cfg.spelled_out().to_dict()
    differ = [k for k in now if k not in _RUN_MAY_CHANGE and saved.get(k) != now[k]]
    if differ:
        folder = os.path.dirname(run_json)
        raise ValueError(
            f"{folder} holds a run with another configuration ({', '.join(differ)} differ); "
            f"continue it with --resume {folder}, or write to another --out"
        )


def run(cfg: ExperimentConfig, run_dir: str, *, log=print) -> Dict:
    """Run (or resume) the whole pipeline into ``run_dir`` and write the report there."""
    rank, _ = world()
    run_json = os.path.join(run_dir, "run.json")
    _check_same_run(cfg, run_json)
    t0 = time.perf_counter()
    ds = load(cfg.dataset)
    log(f"data: {ds}")
    mcfgs, tcfgs = model_configs(cfg, ds), train_configs(cfg)
    sizes = {n: SPNN(mcfgs[n], ds.item_features, ds.user_features).num_parameters()
             for n in ("teacher", "student")}  # student_kd shares the student's shape  # fmt: skip
    if sizes["student"] * 4 > sizes["teacher"]:
        raise ValueError(
            f"the student has {sizes['student']:,} parameters, more than 1/4 of the teacher's "
            f"{sizes['teacher']:,}: lower student_d / student_layers or widen the teacher"
        )
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        _save_json({"format": "spnn_fast.run/1", "config": cfg.to_dict()}, run_json)
    results: Dict[str, List[Dict]] = {m: [] for m in MODELS}
    for seed in range(cfg.seeds):
        teacher = None
        for name in MODELS:
            res = _train_one(name, seed, ds, cfg, mcfgs[name], tcfgs[name], run_dir,
                             teacher if name == "student_kd" else None, log)  # fmt: skip
            results[name].append(res)
            if name == "teacher":
                teacher, _ = load_checkpoint(os.path.join(run_dir, f"seed{seed}", name,
                                                          "best.pt"), cfg.device)  # fmt: skip
    report = build_report(cfg, ds, results, time.perf_counter() - t0)
    if rank == 0:
        from spnn_fast.report import write_report

        write_report(report, run_dir)
    return report


def _mean_std(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _metric_summary(runs: List[Dict], split: str, metric: str) -> Dict[str, float]:
    """Mean and std over seeds and, when the runs have it (results written by older versions
    lack it), the mean over seeds of the standard error over users."""
    out = _mean_std([r["metrics"][split][metric] for r in runs])
    if all("standard_errors" in r for r in runs):
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
