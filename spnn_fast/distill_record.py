"""A model distilled from the teachers of a finished run (``spnn-fast distill``), in the run's
folder beside the run's own models::

    seed<S>/<name>/distill.json   what it learns from and how (written before it trains)
    seed<S>/<name>/last.pt, best.pt, result.json   as the run's own models
    seed<S>/<name>/report.json, report.md          its row next to the run's teachers'

A name is one folder name that none of the run's own models takes, so ``recommend --model NAME
--seed S`` and ``eval RUN/seed<S>/<name>/best.pt`` find it where they find the run's models. Its
``distill.json`` ties the name to one model: the command that made it finds it again (to resume or
reuse it), a command that asks for another model under the same name is refused.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Sequence

from spnn_fast._io import DamagedFileError, read_json, write_json
from spnn_fast.experiment import ENSEMBLE, MODELS
from spnn_fast.model import SPNNConfig
from spnn_fast.trainconfig import TrainConfig

__all__ = [
    "RECORD_FORMAT",
    "RECORD_NAME",
    "TEACHERS",
    "check_name",
    "check_record",
    "default_name",
    "distilled_models",
    "make_record",
    "write_record",
]

RECORD_FORMAT = "spnn_fast.distill/1"
RECORD_NAME = "distill.json"
# What a model learns from: the ensemble of every seed's teacher (combined as the run's
# kd_ensemble says), its own seed's teacher, or nothing (trained plainly: the baseline).
TEACHERS = ("all", "seed", "none")
# Names the run's own models (and its ensemble row) take.
_TAKEN = (*MODELS, "ensemble", ENSEMBLE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Settings that change the speed of training alone: a model resumes or is reused under others.
_SPEED_ONLY = ("teacher_cache_mb",)


def default_name(width: int, layers: int, heads: int, teachers: str) -> str:
    """``distill_d64_l2_h2_all`` (``_seed``) for a distilled model, ``plain_d64_l2_h2`` for the
    same shape trained without teachers."""
    shape = f"d{width}_l{layers}_h{heads}"
    return f"plain_{shape}" if teachers == "none" else f"distill_{shape}_{teachers}"


def check_name(name: object) -> None:
    """ValueError unless ``name`` is a folder name that none of the run's own models takes."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r} must be a folder name of at most 100 letters, digits, "
                         f"'_', '.' or '-', beginning with a letter or a digit")  # fmt: skip
    if name in _TAKEN:
        raise ValueError(f"--name {name} is taken by the run's own models ({', '.join(_TAKEN)}): "
                         f"choose another")  # fmt: skip


def distilled_models(run_dir: str) -> List[str]:
    """The names of the models distilled in ``run_dir`` (of any seed, finished or not)."""
    found = glob.glob(os.path.join(glob.escape(run_dir), "seed*", "*", RECORD_NAME))
    return sorted({os.path.basename(os.path.dirname(p)) for p in found} - set(_TAKEN))


def make_record(name: str, seed: int, teachers: str, teacher_files: Sequence[Dict],
                mcfg: SPNNConfig, tcfg: TrainConfig) -> Dict:  # fmt: skip
    """The ``distill.json`` of a model: its name and seed, what it learns from (``teachers``,
    and ``teacher_files``: each teacher's seed and the sha256 of its best.pt), its shape and how
    it trains; as it reads back from the file."""
    train = {k: v for k, v in tcfg.to_dict().items() if k not in _SPEED_ONLY}
    record = {"format": RECORD_FORMAT, "model": name, "seed": seed, "teachers": teachers,
              "teacher_files": list(teacher_files), "model_config": mcfg.to_dict(),
              "train_config": train}  # fmt: skip
    return json.loads(json.dumps(record))  # tuples as lists, as json gives them back


def _differences(saved: Dict, wanted: Dict) -> List[str]:
    differ = [k for k in wanted if k not in ("model_config", "train_config") and
              saved.get(k) != wanted[k]]  # fmt: skip
    for part in ("model_config", "train_config"):
        have = saved.get(part) if isinstance(saved.get(part), dict) else {}
        differ += [k for k, v in wanted[part].items() if have.get(k) != v]
    return differ


def check_record(folder: str, wanted: Dict) -> bool:
    """Whether ``folder`` holds the model ``wanted`` (a :func:`make_record`) already, begun or
    finished (True), or nothing yet (False). ValueError when it holds another model, or files
    of no distilled model; DamagedFileError for a damaged ``distill.json``."""
    path = os.path.join(folder, RECORD_NAME)
    recover = f"delete the folder {folder} to distil that model again"
    if not os.path.exists(path):
        if os.path.isdir(folder) and os.listdir(folder):
            raise ValueError(f"{folder} holds files but no {RECORD_NAME}: no distilled model is "
                             f"there; choose another --name, or delete the folder")  # fmt: skip
        return False
    saved = read_json(path, ("format", "model", "teachers", "teacher_files"), recover=recover)
    if saved["format"] != RECORD_FORMAT:
        raise DamagedFileError(f"{path} is not a distilled model's record of this spnn_fast "
                               f"(format {saved['format']!r}); {recover}")  # fmt: skip
    differ = _differences(saved, wanted)
    if differ:
        why = ("the run's teachers have changed since: their best.pt files differ, or there "
               "are more of them"
               if differ == ["teacher_files"] else f"{', '.join(differ)} differ")  # fmt: skip
        raise ValueError(f"{folder} holds the model {saved['model']!r}, distilled with other "
                         f"settings ({why}): choose another --name, or delete the folder to "
                         f"distil it again")  # fmt: skip
    return True


def write_record(folder: str, record: Dict) -> None:
    """``folder/distill.json`` (atomic), the folder created if missing."""
    os.makedirs(folder, exist_ok=True)
    write_json(record, os.path.join(folder, RECORD_NAME))
