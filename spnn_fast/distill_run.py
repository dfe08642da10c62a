"""``spnn-fast distill RUN``: one model trained from the teachers of a finished ``spnn-fast
train`` run, evaluated on every split, and reported next to them.

The model is the run's student_kd but for its shape (``width``, ``layers``, ``heads``) and what it
learns from (``teachers``): the ensemble of every seed's teacher, combined as the run's
``kd_ensemble`` says (``"all"``), the teacher of its seed (``"seed"``), or nothing (``"none"``: the
same model trained plainly, the baseline a distilled model is paired with, seed by seed). Every
other setting (window, dropout, learning rate, epochs, patience, window stride, cuts, alpha,
temperature, the feature term's weight and teacher input, side features, backend) is the run's,
from its run.json. The feature term pairs the model's last layer with the last layer of its
seed's teacher, as student_kd's does (both embedded into ``d_knowledge`` dims: any width pairs).
Seed S initialises the model as seed S initialises the run's student_kd (a plain model: the run's
student) and seeds its training, so a model of the students' shape is the run's own, bitwise.

The model lives in the run folder, ``seed<S>/<name>/`` (:mod:`spnn_fast.distill_record`), under
the run folder's guarantees: the run's lock for the whole command, the data checked against the
run's fingerprint, every argument checked before anything is written, a stopped model resumed
from its last.pt and a finished one reused, a damaged file named with its recovery.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from spnn_fast._checks import is_int
from spnn_fast._io import check_path_arg, file_sha256, same_file
from spnn_fast.config import MAX_LAYERS, MAX_WIDTH, ExperimentConfig, num_parameters
from spnn_fast.data import Dataset, load
from spnn_fast.distill_record import (
    TEACHERS,
    check_name,
    check_record,
    default_name,
    make_record,
    write_record,
)
from spnn_fast.distill_report import REPORT_FORMAT, make_row, markdown, write_report
from spnn_fast.experiment import (
    ENSEMBLE,
    METRICS,
    MODELS,
    _ensemble_result,
    _train_one,
    check_memory,
    check_room,
)
from spnn_fast.fingerprint import absolute_dataset, check_same_data, data_fingerprint
from spnn_fast.model import SPNN, SPNNConfig
from spnn_fast.runfolder import (
    claim,
    load_checkpoint,
    model_dir,
    read_result,
    read_run_config,
    read_run_data,
    run_file,
)
from spnn_fast.trainconfig import TrainConfig

__all__ = ["add_arguments", "distill", "main"]

# The splits every row of the report holds (a result.json's, validation included).
SPLITS = ("valid", "test", "cold@3", "cold@5", "cold@10")


def _check_arguments(width, layers, heads, seed, teachers, name, out) -> None:
    """ValueError naming the flag of the first argument that no run could take."""
    for flag, value, low, high, default in (
        ("--width", width, 1, MAX_WIDTH, "the teacher's width"),
        ("--layers", layers, 1, MAX_LAYERS, "the run's"),
        ("--heads", heads, 1, None, "the run's student_heads"),
    ):
        if value is not None and not (is_int(value, low) and (high is None or value <= high)):
            bound = f"an integer in [1, {high}]" if high else "an integer >= 1"
            raise ValueError(f"{flag} must be {bound} (default: {default}), got {value!r}")
    if not is_int(seed, 0):
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    if teachers not in TEACHERS:
        raise ValueError(f"--teachers must be one of {', '.join(TEACHERS)}, got {teachers!r}")
    if name is not None:
        check_name(name)
    if out is not None:
        check_path_arg("--out", out, "a folder")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out} is a file: name a folder for report.json and report.md")


def _check_finished(cfg: ExperimentConfig, run_dir: str) -> None:
    """ValueError unless every model of every seed of the run has its result."""
    missing = [os.path.join(model_dir(run_dir, s, m), "result.json")
               for s in range(cfg.seeds) for m in MODELS
               if not os.path.isfile(os.path.join(model_dir(run_dir, s, m), "result.json"))]  # fmt: skip
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{run_dir} is not a finished run: {missing[0]} is missing{more}; "
                         f"finish it with spnn-fast train --resume {run_dir}")  # fmt: skip


def _shape(cfg: ExperimentConfig, width, layers, heads) -> Tuple[int, int, int]:
    """(width, layers, heads) of the model, the defaults taken from the run."""
    w = cfg.teacher_d if width is None else width
    if layers is None:
        layers = cfg.teacher_layers if w == cfg.teacher_d else cfg.student_layers
    h = cfg.student_heads if heads is None else heads
    if w % h:
        said = {"width": width is None and " (the teacher's, the default)",
                "heads": heads is None and " (the run's student_heads, the default)"}  # fmt: skip
        raise ValueError(f"--width {w}{said['width'] or ''} must be a multiple of --heads "
                         f"{h}{said['heads'] or ''}: each head takes width / heads dims")  # fmt: skip
    return w, layers, h


def _check_run_args(cfg: ExperimentConfig, run_dir: str, seed: int, teachers: str) -> None:
    if seed >= cfg.seeds:
        raise ValueError(f"--seed {seed}: the run in {run_dir} has seeds 0..{cfg.seeds - 1}")
    if teachers == "all" and cfg.seeds < 2:
        raise ValueError(f"--teachers all distils from the ensemble of the run's teachers, one "
                         f"per seed: the run in {run_dir} has one seed (use --teachers seed)")  # fmt: skip


def _check_out(run_dir: str, out: Optional[str], folder: str) -> None:
    """ValueError when the report files in ``out`` would replace files of the run other than
    the model's own report."""
    if out is None:
        return
    here = os.path.realpath(out)
    while True:  # the folder or one above it: another run's (its report would be replaced)
        if os.path.isfile(os.path.join(here, "run.json")) and not same_file(here, run_dir):
            raise ValueError(f"--out {out} is in the run folder {here}, whose files (its "
                             f"report.json, report.md) it would replace: name another folder")  # fmt: skip
        if os.path.dirname(here) == here:
            break
        here = os.path.dirname(here)
    for f in ("report.json", "report.md"):
        taken = run_file(run_dir, os.path.join(out, f))
        if taken is not None and not same_file(taken, os.path.join(folder, f)):
            raise ValueError(f"--out {out} would write over {taken}, a file of the run: name "
                             f"another folder")  # fmt: skip


def _data(cfg: ExperimentConfig, run_dir: str, allow_changed: bool, log) -> Tuple[Dataset, Dict]:
    """The run's data set and its fingerprint, checked against the one run.json records."""
    ds = load(cfg.dataset, time_unit=cfg.time_unit)
    log(f"data: {ds}")
    data = data_fingerprint(cfg.dataset)
    recorded, _ = read_run_data(run_dir)
    check_same_data(recorded, data, run_dir, allow_changed=allow_changed, log=log)
    return ds, data


def _teachers(cfg: ExperimentConfig, run_dir: str, ds: Dataset) -> Tuple[List[SPNN], List[str]]:
    """Every seed's teacher (its best.pt, checked) and the paths they were read from."""
    paths = [os.path.join(model_dir(run_dir, s, "teacher"), "best.pt") for s in range(cfg.seeds)]
    nets = []
    for path in paths:
        net = load_checkpoint(path, cfg.device)[0]
        if net.config.num_items != ds.log.num_items:
            raise ValueError(f"{path} scores {net.config.num_items} items, the data set has "
                             f"{ds.log.num_items}")  # fmt: skip
        nets.append(net)
    return nets, paths


def _teacher_results(cfg: ExperimentConfig, run_dir: str) -> List[Dict]:
    """Every seed's teacher's result, and the run's ensemble row where there is one, checked
    (a damaged one is named before anything is written)."""
    taught = [read_result(os.path.join(model_dir(run_dir, s, "teacher"), "result.json"), SPLITS,
                          METRICS) for s in range(cfg.seeds)]  # fmt: skip
    ens = os.path.join(run_dir, "ensemble", "result.json")
    if cfg.seeds > 1 and os.path.exists(ens):
        read_result(ens, SPLITS, METRICS)
    return taught


def distill(
    run_dir: str, *, width: Optional[int] = None, layers: Optional[int] = None,
    heads: Optional[int] = None, seed: int = 0, teachers: str = "all",
    name: Optional[str] = None, out: Optional[str] = None, device: Optional[str] = None,
    wait: bool = False, allow_changed_data: bool = False, log: Callable[[str], None] = print,
) -> Dict:  # fmt: skip
    """Train (or resume, or reuse) one model from the teachers of the finished run in
    ``run_dir`` and write its report; returns the report (its rows hold the model's metrics and
    standard errors on every split, next to its seed's teacher and the run's ensemble).

    Args:
        width, layers, heads: the model's shape (defaults: the teacher's width; the teacher's
            layers at the teacher's width, else the run's student_layers; the run's
            student_heads, which must divide the width).
        seed: the run's seed whose teacher its feature term reads; it seeds the model's
            initialisation and training as the run's seed does its student_kd.
        teachers: ``"all"`` (the ensemble of every seed's teacher), ``"seed"`` or ``"none"``.
        name: its folder ``seed<seed>/<name>`` (default
            :func:`~spnn_fast.distill_record.default_name`).
        out: the folder of report.json and report.md (default: the model's folder).
        device: where to train (default: the run's).
        wait: wait for another process that owns the run folder instead of failing.
        allow_changed_data: go on with data whose fingerprint differs from the run's.
    """
    _check_arguments(width, layers, heads, seed, teachers, name, out)
    check_path_arg("RUN", run_dir, "a run folder")
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        what = "a folder without run.json" if os.path.isdir(run_dir) else "no such folder"
        raise ValueError(f"RUN {run_dir}: {what}; name the folder of a finished spnn-fast "
                         f"train run")  # fmt: skip
    t0 = time.perf_counter()
    with claim(run_dir, wait=wait, log=log, elsewhere=""):
        p = _plan(run_dir, device, width, layers, heads, seed, teachers, name, out,
                  allow_changed_data, log)  # fmt: skip
        if not check_record(p.folder, p.record):  # the last check: files are written from here
            write_record(p.folder, p.record)
        distilled = teachers != "none"
        _train_one(p.name, seed, p.ds, p.cfg, p.mcfg, p.tcfg, run_dir,
                   p.nets[seed] if distilled else None, p.data, log,
                   p.nets if teachers == "all" else None,
                   init="student_kd" if distilled else "student",
                   allow_changed=allow_changed_data)  # fmt: skip
        own = read_result(os.path.join(p.folder, "result.json"), SPLITS, METRICS)
        rows = {
            p.name: make_row(own, "distilled" if distilled else "plain", p.mcfg.to_dict(),
                             [seed]),
            "teacher": make_row(p.taught[seed], "teacher", p.nets[seed].config.to_dict(), [seed]),
        }  # fmt: skip
        if p.cfg.seeds > 1:  # the run's row, or evaluated as the run evaluates it
            ens = _ensemble_result(p.cfg, p.ds, p.nets, run_dir, log)
            rows[ENSEMBLE] = make_row(ens, "ensemble", p.nets[0].config.to_dict(),
                                      range(p.cfg.seeds),
                                      sum(r["train_seconds"] for r in p.taught))  # fmt: skip
        events = p.ds.log
        report = {
            "format": REPORT_FORMAT, "run": os.path.abspath(run_dir), "model": p.name,
            "folder": os.path.abspath(p.folder), "seed": seed, "teachers": teachers,
            "teacher_seeds": p.record_seeds,
            "ensemble": p.cfg.kd_ensemble if teachers == "all" else None,
            "dataset": {"name": p.ds.name, "users": events.num_users,
                        "items": events.num_items, "events": events.num_events},
            "rows": rows, "wall_seconds": time.perf_counter() - t0,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        }  # fmt: skip
        write_report(report, p.folder if out is None else out)
    return report


@dataclasses.dataclass
class _Plan:
    """What a distill command found and chose, every check made, nothing written yet."""

    cfg: ExperimentConfig  # the run's settings
    name: str
    folder: str  # the model's folder in the run
    ds: Dataset
    data: Dict  # the data's fingerprint
    mcfg: SPNNConfig
    tcfg: TrainConfig
    nets: List[SPNN]  # every seed's teacher
    taught: List[Dict]  # every seed's teacher's result
    record: Dict  # the model's distill.json
    record_seeds: List[int]  # the seeds whose teachers it learns from


def _plan(run_dir, device, width, layers, heads, seed, teachers, name, out, allow_changed,
          log) -> _Plan:  # fmt: skip
    """Every check of a distill command, in the claimed run folder, before anything is
    written."""
    cfg = read_run_config(run_dir, device)
    cfg = dataclasses.replace(cfg, dataset=absolute_dataset(cfg.dataset))
    _check_finished(cfg, run_dir)
    _check_run_args(cfg, run_dir, seed, teachers)
    w, n_layers, h = _shape(cfg, width, layers, heads)
    name = default_name(w, n_layers, h, teachers) if name is None else name
    folder = model_dir(run_dir, seed, name)
    _check_out(run_dir, out, folder)
    shaped = dataclasses.replace(cfg, student_d=w, student_layers=n_layers, student_heads=h)
    shaped.check_backend()
    ds, data = _data(cfg, run_dir, allow_changed, log)
    mcfgs = shaped.model_configs(ds)
    sizes = {n: num_parameters(m, ds) for n, m in mcfgs.items()}
    check_memory(shaped, ds, sizes)
    done = os.path.exists(os.path.join(folder, "result.json"))
    check_room("the model", [] if done else [sizes["student_kd"]], folder)
    nets, paths = _teachers(cfg, run_dir, ds)
    taught = _teacher_results(cfg, run_dir)
    learn = {"all": list(range(cfg.seeds)), "seed": [seed], "none": []}[teachers]
    tcfg = shaped.train_configs()["student" if teachers == "none" else "student_kd"]
    files = [{"seed": s, "sha256": file_sha256(paths[s])} for s in learn]
    record = make_record(name, seed, teachers, files, mcfgs["student_kd"], tcfg)
    if out is not None:  # made now, the last check: a folder that cannot be made fails here
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot make that folder: {e.strerror}") from None
    return _Plan(cfg, name, folder, ds, data, mcfgs["student_kd"], tcfg, nets, taught, record,
                 learn)  # fmt: skip


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``spnn-fast distill`` on ``parser`` (a subcommand's parser)."""
    parser.add_argument("run", metavar="RUN", help="the folder of a finished spnn-fast train run")
    parser.add_argument("--width", type=int, default=None,
                        help="the model's width (default: the teacher's)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None,
                        help="its layers (default: the teacher's at the teacher's width, else "
                             "the run's student_layers)")  # fmt: skip
    parser.add_argument("--heads", type=int, default=None,
                        help="its attention heads, a divisor of the width (default: the run's "
                             "student_heads)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="the run's seed: its teacher is the one the feature term reads, "
                             "and it seeds the model as it seeds the run's student_kd (without "
                             "teachers: its student) (default 0)")  # fmt: skip
    parser.add_argument("--teachers", choices=TEACHERS, default="all",
                        help="all: the ensemble of the run's teachers, combined as its "
                             "kd_ensemble says; seed: the seed's teacher; none: no teachers, "
                             "the baseline (default all)")  # fmt: skip
    parser.add_argument("--name", default=None,
                        help="the model's folder RUN/seed<S>/<NAME>, the name recommend --model "
                             "takes (default from its shape and teachers: distill_d64_l2_h1_all, "
                             "plain_d64_l2_h1)")  # fmt: skip
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="the folder of report.json and report.md (default: the model's)")  # fmt: skip
    parser.add_argument("--device", default=None, help="where to train (default: the run's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the run's, kept in its run.json)")  # fmt: skip
    parser.add_argument("--wait", action="store_true",
                        help="when another process owns the run folder, wait for it instead of "
                             "failing")  # fmt: skip
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="go on with data whose fingerprint differs from the run's")  # fmt: skip
    return parser


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run the command for parsed ``args`` (see :func:`add_arguments`); prints the report and
    returns 0."""
    report = distill(
        args.run, width=args.width, layers=args.layers, heads=args.heads, seed=args.seed,
        teachers=args.teachers, name=args.name, out=args.out, device=args.device,
        wait=args.wait, allow_changed_data=args.allow_changed_data, log=log,
    )  # fmt: skip
    log(markdown(report))
    log(f"report: {os.path.join(args.out or report['folder'], 'report.md')}")
    return 0
