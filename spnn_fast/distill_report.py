"""The report of a distilled model (``spnn-fast distill``): its row next to the run's teachers',
as report.json and report.md.

A row is a model's result (its metrics and their standard errors over users on every split, as
in its ``result.json``) with its role, its shape, its parameters and its training time. The rows:
the model, the teacher of its seed, and the ensemble of the run's teachers where the run has one
(its training time the sum of its teachers': what the ensemble costs to train).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from spnn_fast._io import atomic_write, write_json

__all__ = ["REPORT_FORMAT", "ROLES", "make_row", "markdown", "write_report"]

REPORT_FORMAT = "spnn_fast.distill_report/1"
ROLES = ("distilled", "plain", "teacher", "ensemble")
_SHOW = ("NDCG@10", "HR@10", "MRR@10", "NDCG@20", "HR@20")
_LEARNS = {
    "all": "distilled from the ensemble of the run's {n} teachers ({ensemble})",
    "seed": "distilled from the teacher of its seed",
    "none": "trained without teachers (the baseline of a distilled model of its shape)",
}


def make_row(result: Dict, role: str, config: Dict, seeds: Sequence[int],
             train_seconds: Optional[float] = None) -> Dict:  # fmt: skip
    """A report row of a model's ``result`` (a result.json): ``role`` (one of :data:`ROLES`),
    its shape from its SPNNConfig dict ``config``, the run's ``seeds`` it stands for, and its
    training time (``train_seconds``, default the result's)."""
    if role not in ROLES:
        raise ValueError(f"role={role!r} must be one of {', '.join(ROLES)}")
    seconds = result["train_seconds"] if train_seconds is None else train_seconds
    return {
        "role": role, "d_model": config["d_model"], "n_layers": config["n_layers"],
        "n_heads": config["n_heads"], "seeds": list(seeds), "params": int(result["params"]),
        "train_seconds": float(seconds), "best_epoch": result["best_epoch"],
        "metrics": result["metrics"], "standard_errors": result["standard_errors"],
    }  # fmt: skip


def _splits(report: Dict) -> List[str]:
    """The splits of the model's row, validation first."""
    have = list(report["rows"][report["model"]]["metrics"])
    return ["valid", *(s for s in have if s != "valid")] if "valid" in have else have


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "n/a"


def markdown(report: Dict) -> str:
    """report.md: every row on every split (value ± its standard error over users), and the
    model against each other row."""
    name, rows, ds = report["model"], report["rows"], report["dataset"]
    learns = _LEARNS[report["teachers"]].format(n=len(report["teacher_seeds"]),
                                                ensemble=report["ensemble"])  # fmt: skip
    # a distilled model differs from the run's student_kd, a plain one from its student
    base = ("student, but for its shape" if report["teachers"] == "none"
            else "student_kd, but for its shape and its teachers")  # fmt: skip
    lines = [
        f"# {name}, seed {report['seed']}, on {ds['name']}",
        "",
        f"{name} is {learns}; it trains as the run's {base} (run {report['run']}). {ds['users']} users, {ds['items']} items; full ranking; ± is "
        f"the standard error over users of one model's metric.",
        "",
        "| model | role | d x layers, heads | params | train seconds | split | "
        + " | ".join(_SHOW) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(_SHOW),
    ]  # fmt: skip
    for model, r in rows.items():
        shape = f"{r['d_model']} x {r['n_layers']}, {r['n_heads']}"
        for split in _splits(report):
            m, se = r["metrics"][split], r["standard_errors"][split]
            cells = " | ".join(f"{m[k]:.4f} ± {se[k]:.4f}" for k in _SHOW)
            lines.append(f"| {model} | {r['role']} | {shape} | {r['params']:,} | "
                         f"{r['train_seconds']:.1f} | {split} | {cells} |")  # fmt: skip
    own = rows[name]
    lines.append("")
    for other, r in rows.items():
        if other == name:
            continue
        ndcg = ", ".join(
            f"{split} {_ratio(own['metrics'][split]['NDCG@10'], r['metrics'][split]['NDCG@10'])}"
            for split in _splits(report) if split in r["metrics"]
        )  # fmt: skip
        lines.append(f"- {name} / {other}: NDCG@10 {ndcg}; parameters "
                     f"{_ratio(own['params'], r['params'])}; train seconds "
                     f"{_ratio(own['train_seconds'], r['train_seconds'])}")  # fmt: skip
    lines += ["", "The ensemble's train seconds are its teachers' together; a distilled model's "
              "are its own (its teachers were trained before it).", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(report: Dict, out_dir: str) -> None:
    """``out_dir/report.json`` and ``out_dir/report.md`` (atomic), the folder created if
    missing."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(report, os.path.join(out_dir, "report.json"))
    text = markdown(json.loads(json.dumps(report)))
    atomic_write(os.path.join(out_dir, "report.md"), lambda f: f.write(text), text=True)
