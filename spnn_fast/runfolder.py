"""The run folder of the main job, and the files in it::

    run.lock                      held by the process that runs in the folder (:func:`claim`)
    run.json                      the configuration, a fingerprint of the data
                                  (:mod:`spnn_fast.fingerprint`) and the CPU threads (what
                                  --resume reads)
    seed<S>/<model>/last.pt       trainer state after the last finished epoch (atomic)
    seed<S>/<model>/best.pt       the selected model (spnn-fast eval reads it)
    seed<S>/<model>/result.json   its metrics, history and timings
    report.json, report.md, report.png

One process at a time owns a folder: it takes ``run.lock`` before it reads or writes anything
there. Every file is written atomically and validated when read back: a damaged one is named in
the error, with what to do about it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from spnn_fast._checks import check_device, is_int, is_real
from spnn_fast._io import (
    DamagedFileError,
    atomic_write,
    json_kind,
    load_checkpoint_file,
    not_finite,
    read_json,
    same_file,
    write_json,
)
from spnn_fast._lock import FolderBusyError, LockFile, describe_holder
from spnn_fast.config import ExperimentConfig
from spnn_fast.distributed import world
from spnn_fast.fingerprint import absolute_dataset, is_fingerprint
from spnn_fast.model import SPNN, SPNNConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOCK_NAME",
    "RUN_FILES",
    "RUN_FORMAT",
    "FolderBusyError",
    "agree",
    "check_same_run",
    "check_trainer_state",
    "claim",
    "has_models",
    "load_checkpoint",
    "model_dir",
    "read_result",
    "read_run_config",
    "read_run_data",
    "read_run_threads",
    "run_file",
    "run_of_checkpoint",
    "save_checkpoint",
    "write_run_config",
]

RUN_FORMAT = "spnn_fast.run/2"
CHECKPOINT_FORMAT = "spnn_fast.checkpoint/1"
LOCK_NAME = "run.lock"
# The files of a run folder, as patterns of their paths in it.
# (seed*/*/*.json and report.md: also a distilled model's distill.json and report, in its folder)
RUN_FILES = ("run.json", LOCK_NAME, "report.json", "report.md", "report.png", "seed*/*/last.pt",
             "seed*/*/best.pt", "seed*/*/*.json", "seed*/*/report.md", "ensemble/result.json")  # fmt: skip


def model_dir(run_dir: str, seed: int, name: str) -> str:
    return os.path.join(run_dir, f"seed{seed}", name)


def has_models(run_dir: str) -> bool:
    """True when a model of the run in ``run_dir`` has started (or finished) training there."""
    files = ("last.pt", "best.pt", "result.json")
    return any(glob.glob(os.path.join(glob.escape(run_dir), "seed*", "*", f)) for f in files)


def run_file(run_dir: str, path: str) -> Optional[str]:
    """The file of the run in ``run_dir`` that ``path`` names, or None: one of :data:`RUN_FILES`,
    whether it exists yet or not, reached by any path (relative, through symlinks, a hard
    link)."""
    for pattern in RUN_FILES:
        for f in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
            if same_file(f, path):
                return f
    inside = os.path.relpath(os.path.realpath(path), os.path.realpath(run_dir))
    if inside.split(os.sep)[0] != os.pardir and any(fnmatch.fnmatch(inside, p) for p in RUN_FILES):
        return os.path.join(run_dir, inside)
    return None


def run_of_checkpoint(path: str) -> Optional[str]:
    """The run folder that holds the checkpoint ``path`` (``RUN/seed<S>/<model>/best.pt``), or
    None for a checkpoint outside a run folder."""
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return run_dir if os.path.isfile(os.path.join(run_dir, "run.json")) else None


# ------------------------------------------------------------------------------ ownership
def _on_rank0(fn: Callable[[], object]) -> object:
    """``fn()`` on rank 0 alone; under torchrun every rank returns its value or raises its
    exception, so no rank waits for a rank that has failed."""
    rank, size = world()
    if size == 1:
        return fn()
    box: List[object] = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # handed to every rank
            box[1] = e
    torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def agree(fn: Callable[[], object]) -> object:
    """``fn()`` on every rank; under torchrun, when it raises on any rank, every rank raises (its
    own exception, or the first rank's), so that none goes on to wait for the others."""
    rank, size = world()
    if size == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # shared with every rank
        error = e
    errors: List[object] = [None] * size
    torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise error if error is not None else first
    return result


def _make_folder(run_dir: str) -> bool:
    """Create ``run_dir`` if it is missing (True when this call created it)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise NotADirectoryError(f"{run_dir} is a file, not a run folder: name a folder")
    try:
        os.makedirs(run_dir)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise OSError(e.errno, f"cannot create the run folder {run_dir}: {e.strerror}") from None


@contextlib.contextmanager
def claim(run_dir: str, *, wait: bool = False, log: Callable[[str], None] = print,
          poll_seconds: float = 0.5, elsewhere: str = "write to another --out") -> Iterator[None]:  # fmt: skip
    """Own ``run_dir`` for the ``with`` block: create it if missing and take its ``run.lock``.

    A folder another process owns raises :class:`FolderBusyError` naming that process (pid, host,
    start time, command) and saying to wait (or go ``elsewhere``), or, with ``wait``, is waited
    for. Under torchrun rank 0 alone takes the lock and every rank learns the outcome. When the
    block fails and the folder, which it created, holds nothing but the lock, it is removed.
    """
    lock = LockFile(os.path.join(run_dir, LOCK_NAME))
    created = False

    def attempt() -> Optional[dict]:
        nonlocal created
        created = _make_folder(run_dir) or created
        try:
            return lock.try_acquire()
        except OSError as e:
            raise OSError(e.errno, f"cannot write into the run folder {run_dir}: "
                                   f"{e.strerror}") from None  # fmt: skip

    told = False
    while True:
        holder = _on_rank0(attempt)
        if holder is None:
            break
        busy = f"the run folder {run_dir} is in use by {describe_holder(holder)}"
        if not wait:
            stale = f"; {holder['stale_hint']}" if holder.get("stale_hint") else ""
            other = f", or {elsewhere}" if elsewhere else ""
            raise FolderBusyError(f"{busy}; wait for it with --wait{other}{stale}")
        if not told:
            log(f"{busy}; waiting until it is free (--wait)")
            told = True
        time.sleep(poll_seconds)
    try:
        yield
    except BaseException:
        if lock.held:
            give_up = created and set(os.listdir(run_dir)) <= {LOCK_NAME}
            lock.release(remove=give_up)
            if give_up:
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)
        raise
    lock.release()


# ------------------------------------------------------------------------------ run.json
def write_run_config(cfg: ExperimentConfig, run_dir: str, data: Optional[Dict] = None,
                     chosen: Optional[Dict] = None, earlier_data: Optional[List[Dict]] = None,
                     threads: Optional[int] = None) -> None:  # fmt: skip
    """``run_dir/run.json``: the configuration as given, the fingerprint of its ``data``, what
    was ``chosen`` for the data (student_d when None), the fingerprints of data some of its
    models were trained on before (``--allow-changed-data``) and the CPU ``threads`` its models
    train with (what a resumed run uses again); left as it is when it says the same."""
    record = {"format": RUN_FORMAT, "config": cfg.to_dict()}
    extras = (("data", data), ("chosen", chosen), ("earlier_data", earlier_data),
              ("threads", threads))  # fmt: skip
    record.update({k: v for k, v in extras if v})
    path = os.path.join(run_dir, "run.json")
    with contextlib.suppress(OSError, ValueError):
        if read_json(path) == record:
            return
    write_json(record, path)


_RUN_RECOVER = ("train into another --out (or, to keep its finished models, delete it and train "
                "again into this folder with the run's exact settings: report.json's \"config\" "
                "holds them if the run finished)")  # fmt: skip


def _read_run(run_dir: str) -> Tuple[str, Dict]:
    path = os.path.join(run_dir, "run.json")
    saved = read_json(path, ("format", "config"), recover=_RUN_RECOVER)
    if saved["format"] != RUN_FORMAT:
        raise DamagedFileError(
            f"{path} is not a run of this spnn_fast (format {saved['format']!r}, expected "
            f"{RUN_FORMAT!r}); train into another folder"
        )
    threads = saved.get("threads")
    for key, ok, rule in (
        ("config", isinstance(saved["config"], dict), "an object"),
        ("threads", threads is None or is_int(threads, 1), "an integer >= 1"),
    ):
        if not ok:
            raise DamagedFileError(f"{path}: {key!r} must be {rule}, got "
                                   f"{json_kind(saved[key])}; {_RUN_RECOVER}")  # fmt: skip
    return path, saved


def read_run_config(run_dir: str, device: Optional[str] = None) -> ExperimentConfig:
    """The configuration in ``run_dir/run.json`` (with ``device``, when given, in place of the
    saved one: a run may go on elsewhere, and the saved device need not exist here)."""
    path, saved = _read_run(run_dir)
    config = {"loss": "full", **saved["config"]}  # older runs trained with the full loss
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(ExperimentConfig)})
    if unknown:
        raise DamagedFileError(f"{path} holds settings this spnn_fast does not know (unknown "
                               f"settings: {', '.join(unknown)}); {_RUN_RECOVER}")  # fmt: skip
    try:  # the file's own settings, checked on a device every machine has
        cfg = ExperimentConfig(**{**config, "device": "cpu"})
    except (TypeError, ValueError) as e:
        raise DamagedFileError(f"{path} holds settings this spnn_fast does not accept ({e}); "
                               f"{_RUN_RECOVER}") from None  # fmt: skip
    saved_device = config.get("device", "cpu")
    if device is None and not isinstance(saved_device, str):
        raise DamagedFileError(f"{path}: 'device' must be a string, got "
                               f"{json_kind(saved_device)}; pass --device, or {_RUN_RECOVER}")  # fmt: skip
    try:
        return dataclasses.replace(cfg, device=device if device is not None else saved_device)
    except ValueError as e:
        raise ValueError(f"{e} (the run in {run_dir} was saved with device={saved_device!r}; "
                         f"pass --device to go on elsewhere)") from None  # fmt: skip


def read_run_threads(run_dir: str) -> Optional[int]:
    """The CPU threads in ``run_dir/run.json`` (None where an older spnn_fast wrote none)."""
    return _read_run(run_dir)[1].get("threads")


def read_run_data(run_dir: str) -> Tuple[Optional[Dict], List[Dict]]:
    """(the data fingerprint in ``run_dir/run.json``, or None for a run that recorded none; the
    fingerprints of data its models were trained on before, oldest first)."""
    path, saved = _read_run(run_dir)
    data, earlier = saved.get("data"), saved.get("earlier_data", [])
    if (data is not None and not is_fingerprint(data)) or not (
        isinstance(earlier, list) and all(map(is_fingerprint, earlier))
    ):
        raise DamagedFileError(f"{path}: its data fingerprint is damaged; {_RUN_RECOVER}")
    return data, earlier


def check_same_run(cfg: ExperimentConfig, run_dir: str, ds=None) -> None:
    """ValueError if ``run_dir`` holds a run whose results ``cfg`` must not reuse (with the data
    set ``ds``, settings chosen from the data, such as ``student_d=None``, compare as chosen)."""
    if not os.path.exists(os.path.join(run_dir, "run.json")):
        return
    saved = read_run_config(run_dir, cfg.device)
    # An older run.json may hold a relative path, which its runs read from the working directory.
    saved = dataclasses.replace(saved, dataset=absolute_dataset(saved.dataset))
    if ds is not None:
        saved, cfg = saved.for_data(ds), cfg.for_data(ds)
    differ = saved.differences(cfg)
    if differ:
        raise ValueError(
            f"{run_dir} holds a run with another configuration ({', '.join(differ)} differ); "
            f"continue it with --resume {run_dir}, or write to another --out"
        )


# ------------------------------------------------------------------------------ models
def save_checkpoint(model: SPNN, path: str, *, name: str, seed: int, dataset: str,
                    data: Optional[Dict] = None, time_unit: Optional[str] = None) -> None:  # fmt: skip
    """The selected model, as ``spnn-fast eval`` and :func:`load_checkpoint` read it (with
    ``data``, the fingerprint of the data it was trained on, and the unit its timestamps were
    read in)."""
    ck = {"format": CHECKPOINT_FORMAT, "model": name, "seed": seed,
          "config": model.config.to_dict(), "state_dict": model.state_dict(), "dataset": dataset}  # fmt: skip
    if data is not None:
        ck["data"] = data
    if time_unit is not None:
        ck["time_unit"] = time_unit
    atomic_write(path, lambda f: torch.save(ck, f))


def load_checkpoint(path: str, device: str = "cpu") -> Tuple[SPNN, Dict]:
    """(model, checkpoint dict) from a ``best.pt`` written by :func:`save_checkpoint`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_device(device)  # a device problem is not a bad file
    recover = "delete it (and its result.json) to train that model again"
    ck = load_checkpoint_file(path, device, ("format", "config", "state_dict"), recover)
    if ck["format"] != CHECKPOINT_FORMAT:
        raise DamagedFileError(f"{path} is not an spnn_fast model checkpoint; {recover}")
    try:
        model = SPNN.from_state(SPNNConfig.from_dict(ck["config"]), ck["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise DamagedFileError(f"{path} does not hold a model this spnn_fast can rebuild "
                               f"({type(e).__name__}: {why}); {recover}") from None  # fmt: skip
    bad = not_finite(ck["state_dict"])
    if bad is not None:
        raise DamagedFileError(f"{path}: {bad}; {recover}")
    return model, ck


def _same_shapes(saved: object, expected: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when ``saved`` is a state dict with ``expected``'s keys and shapes, else what
    differs."""
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        return "not a state dict of tensors"
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        parts = [f"{what} {', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''}"
                 for what, keys in (("lacks", missing), ("has unknown", extra)) if keys]  # fmt: skip
        return "its state " + " and ".join(parts)
    for k, v in expected.items():
        if saved[k].shape != v.shape:
            return f"{k} has shape {tuple(saved[k].shape)}, expected {tuple(v.shape)}"
    return None


def check_trainer_state(path: str, keys: Sequence[str], objective: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, seed: int) -> None:  # fmt: skip
    """DamagedFileError unless ``path`` (a ``last.pt``) holds the trainer state of this model:
    the ``keys`` of the state, each of the right kind, and tensors that fit ``objective`` and
    ``optimizer``. Checked before the trainer loads it, so that a damaged or foreign file is
    named instead of failing deep inside ``load_state_dict``."""
    recover = ("delete it to train this model again from its first epoch (the other models' "
               "files are kept)")  # fmt: skip
    st = load_checkpoint_file(path, "cpu", keys, recover)

    def bad(what: str) -> DamagedFileError:
        return DamagedFileError(f"{path} is damaged or belongs to another model ({what}); "
                                f"{recover}")  # fmt: skip

    if st["seed"] != seed:
        raise bad(f"written for seed {st['seed']!r}, this model is seed {seed}")
    counts = ("epoch", "bad_epochs", "windows_seen")
    if not all(is_int(st[k], 0) for k in counts) or not is_real(st["train_seconds"], 0.0):
        raise bad("its epoch counts are not numbers >= 0")
    if not isinstance(st["history"], list) or len(st["history"]) != st["epoch"]:
        raise bad("its history does not have one entry per epoch")
    best = st["best"]
    if not isinstance(best, dict) or not {"ndcg", "epoch", "state"} <= set(best):
        raise bad("no best model record")
    why = _same_shapes(st["objective"], objective.state_dict())
    if why is None and best["state"] is not None:
        model = getattr(objective, "model", None)
        if model is not None:
            why = _same_shapes(best["state"], model.state_dict())
    why = why or not_finite(st["objective"])
    why = why or (best["state"] is not None and not_finite(best["state"], "best state's"))
    if why:
        raise bad(why)
    why = _optimizer_mismatch(st["optimizer"], optimizer)
    if why is not None:
        raise bad(f"optimizer state: {why}")


def _optimizer_mismatch(saved: object, optimizer: torch.optim.Optimizer) -> Optional[str]:
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        return "not an optimizer state"
    groups = saved["param_groups"]
    ours = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(ours):
        return "another number of parameter groups"
    if any(not isinstance(g, dict) or len(g.get("params", ())) != len(o["params"])
           for g, o in zip(groups, ours)):  # fmt: skip
        return "another number of parameters"
    params = [p for o in ours for p in o["params"]]
    state = saved["state"]
    if not isinstance(state, dict):
        return "not an optimizer state"
    for i, s in state.items():
        if not is_int(i, 0) or i >= len(params) or not isinstance(s, dict):
            return f"an entry for parameter {i!r}, which this model does not have"
        for k, v in s.items():
            if k.startswith("exp_avg") and (not isinstance(v, torch.Tensor)
                                            or v.shape != params[i].shape):  # fmt: skip
                return f"{k} of parameter {i} does not fit it"
        why = not_finite({f"{k} of parameter {i}": v for k, v in s.items()
                           if isinstance(v, torch.Tensor)}, "moment")  # fmt: skip
        if why:
            return why
    return None


def read_result(path: str, splits: Sequence[str] = (), metrics: Sequence[str] = ()) -> Dict:
    """A model's ``result.json``, checked to hold a number for each of ``metrics`` on each of
    ``splits`` (and its standard error), and the rest of what the report reads."""
    keys = ("metrics", "standard_errors", "history", "best_epoch", "train_seconds",
            "windows_per_second", "params")  # fmt: skip
    recover = "delete it to evaluate that model again"
    res = read_json(path, keys, recover=recover)
    problems = [k for k in ("train_seconds", "windows_per_second") if not is_real(res[k], 0.0)]
    problems += [k for k in ("params", "best_epoch") if not is_int(res[k])]
    problems += [] if isinstance(res["history"], list) else ["history"]
    for table in ("metrics", "standard_errors"):
        t = res[table]
        for split in splits:
            row = t.get(split) if isinstance(t, dict) else None
            if not isinstance(row, dict) or not all(is_real(row.get(m)) for m in metrics):
                problems.append(f"{table}[{split!r}]")
    if problems:
        raise DamagedFileError(f"{path} is damaged: no valid {', '.join(problems[:4])}; "
                               f"{recover}")  # fmt: skip
    return res
