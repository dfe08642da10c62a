"""The run folder of the main job, and the files in it::

    run.json                      the configuration (what --resume reads)
    seed<S>/<model>/last.pt       trainer state after the last finished epoch (atomic)
    seed<S>/<model>/best.pt       the selected model (spnn-fast eval reads it)
    seed<S>/<model>/result.json   its metrics, history and timings
    report.json, report.md, report.png

Every file is written atomically and validated when read back: a damaged one is named in the
error, with what to do about it.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from spnn_fast._checks import check_device
from spnn_fast._io import (
    DamagedFileError,
    atomic_write,
    load_checkpoint_file,
    read_json,
    write_json,
)
from spnn_fast.config import ExperimentConfig
from spnn_fast.model import SPNN, SPNNConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "RUN_FORMAT",
    "check_same_run",
    "load_checkpoint",
    "model_dir",
    "read_result",
    "read_run_config",
    "save_checkpoint",
    "write_run_config",
]

RUN_FORMAT = "spnn_fast.run/2"
CHECKPOINT_FORMAT = "spnn_fast.checkpoint/1"


def model_dir(run_dir: str, seed: int, name: str) -> str:
    return os.path.join(run_dir, f"seed{seed}", name)


def write_run_config(cfg: ExperimentConfig, run_dir: str) -> None:
    write_json({"format": RUN_FORMAT, "config": cfg.to_dict()}, os.path.join(run_dir, "run.json"))


def read_run_config(run_dir: str, device: Optional[str] = None) -> ExperimentConfig:
    """The configuration in ``run_dir/run.json`` (with ``device``, when given, in place of the
    saved one: a run may go on elsewhere, and the saved device need not exist here)."""
    path = os.path.join(run_dir, "run.json")
    saved = read_json(path, ("format", "config"))
    if saved["format"] != RUN_FORMAT or not isinstance(saved["config"], dict):
        raise DamagedFileError(
            f"{path} is not a run of this spnn_fast (format {saved['format']!r}, expected "
            f"{RUN_FORMAT!r}); train into another folder"
        )
    config = dict(saved["config"])
    if device is not None:
        config["device"] = device
    try:
        return ExperimentConfig(**config)
    except TypeError as e:
        raise DamagedFileError(
            f"{path} holds settings this spnn_fast does not know ({e})"
        ) from None


def check_same_run(cfg: ExperimentConfig, run_dir: str) -> None:
    """ValueError if ``run_dir`` holds a run whose results ``cfg`` must not reuse."""
    if not os.path.exists(os.path.join(run_dir, "run.json")):
        return
    differ = read_run_config(run_dir, cfg.device).differences(cfg)
    if differ:
        raise ValueError(
            f"{run_dir} holds a run with another configuration ({', '.join(differ)} differ); "
            f"continue it with --resume {run_dir}, or write to another --out"
        )


def save_checkpoint(model: SPNN, path: str, *, name: str, seed: int, dataset: str) -> None:
    """The selected model, as ``spnn-fast eval`` and :func:`load_checkpoint` read it."""
    ck = {"format": CHECKPOINT_FORMAT, "model": name, "seed": seed,
          "config": model.config.to_dict(), "state_dict": model.state_dict(), "dataset": dataset}  # fmt: skip
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
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise DamagedFileError(f"{path} does not hold a model this spnn_fast can rebuild "
                               f"({type(e).__name__}: {e}); {recover}") from None  # fmt: skip
    return model, ck


def read_result(path: str) -> Dict:
    """A model's ``result.json``."""
    keys = ("metrics", "standard_errors", "history", "best_epoch", "train_seconds",
            "windows_per_second", "params")  # fmt: skip
    return read_json(path, keys, recover="delete it to evaluate that model again")
