"""Writes an experiment's report: report.json, report.md (the same as tables) and report.png."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict

from spnn_fast._io import atomic_write

__all__ = ["markdown", "write_report"]

_LOG = logging.getLogger("spnn_fast")
_SHOW = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")


def _ms(d: Dict[str, float], digits: int = 4) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def markdown(report: Dict) -> str:
    ds, models = report["dataset"], report["models"]
    lines = [
        f"# SPNN on {ds['name']}",
        "",
        f"{ds['users']} users, {ds['items']} items, {ds['events']} events; "
        f"{len(report['seeds'])} seeds (mean ± std). {report['protocol']['split']}; "
        f"{report['protocol']['ranking']}; selection on {report['protocol']['selection']}.",
        "",
        "| model | params | split | " + " | ".join(_SHOW) + " |",
        "|---|---|---|" + "---|" * len(_SHOW),
    ]
    for name, m in models.items():
        for split, metrics in m["metrics"].items():
            lines.append(
                f"| {name} | {m['params']:,} | {split} | "
                + " | ".join(_ms(metrics[k]) for k in _SHOW)
                + " |"
            )
    lines += ["", "| model | train seconds | sequences / s | best epochs |", "|---|---|---|---|"]
    for name, m in models.items():
        if not any(m["history"]):  # evaluated, not trained (the teachers' ensemble)
            continue
        lines.append(
            f"| {name} | {_ms(m['train_seconds'], 1)} | {m['sequences_per_second']['mean']:.0f} | "
            f"{m['best_epoch']} |"
        )
    if {"student", "student_kd", "teacher"} <= set(models):
        s, kd, t = models["student"], models["student_kd"], models["teacher"]
        cold = kd["metrics"]["cold@5"]["NDCG@10"]["mean"] / max(
            s["metrics"]["cold@5"]["NDCG@10"]["mean"], 1e-12
        )
        keep = kd["metrics"]["all"]["NDCG@10"]["mean"] / max(
            t["metrics"]["all"]["NDCG@10"]["mean"], 1e-12
        )
        lines += [
            "",
            f"- student_kd / student, cold@5 NDCG@10: {cold:.3f}x",
            f"- student_kd / teacher, all-users NDCG@10: {keep:.3f}",
            f"- student / teacher parameters: {kd['params'] / t['params']:.3f}",
        ]
        if "teacher_ensemble" in models:
            ens = models["teacher_ensemble"]["metrics"]
            lines.append(
                "- teacher_ensemble / student, cold@5 NDCG@10: "
                f"{ens['cold@5']['NDCG@10']['mean'] / max(s['metrics']['cold@5']['NDCG@10']['mean'], 1e-12):.3f}x; "
                f"all-users: {ens['all']['NDCG@10']['mean'] / max(s['metrics']['all']['NDCG@10']['mean'], 1e-12):.3f}x"
            )
    se = {n: m["metrics"]["all"]["NDCG@10"].get("se_users") for n, m in models.items()}
    if all(v is not None for v in se.values()):
        lines += [
            "",
            "Sampling error: the standard error over users of one run's all-users NDCG@10 is "
            + ", ".join(f"{n} {v:.4f}" for n, v in se.items())
            + " (the spread over seeds does not include it).",
        ]
    lines += [
        "",
        "Full metrics (HR, NDCG, MRR at 5, 10, 20; `se_users`: standard error over users) are in "
        "report.json.",
    ]
    return "\n".join(lines) + "\n"


def _plot(report: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _LOG.warning("matplotlib is not installed: report.png skipped (pip install matplotlib)")
        return
    models = report["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, m) in enumerate(models.items()):
        for s, hist in enumerate(m["history"]):
            ax1.plot([h["epoch"] for h in hist], [h["valid_NDCG@10"] for h in hist],
                     color=f"C{i}", alpha=0.8, label=name if s == 0 else None)  # fmt: skip
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation NDCG@10")
    ax1.set_title("validation NDCG@10 per epoch (one line per seed)")
    ax1.legend()
    splits = list(next(iter(models.values()))["metrics"])
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        means = [m["metrics"][s]["NDCG@10"]["mean"] for s in splits]
        stds = [m["metrics"][s]["NDCG@10"]["std"] for s in splits]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(splits))]
        ax2.bar(xs, means, width, yerr=stds, label=name, color=f"C{i}", capsize=3)
    ax2.set_xticks(range(len(splits)))
    ax2.set_xticklabels(splits)
    ax2.set_ylabel("test NDCG@10")
    ax2.set_title("all users vs cold-start inputs")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: Dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (
        ("report.json", json.dumps(report, indent=2)),
        ("report.md", markdown(report)),
    ):
        atomic_write(os.path.join(out_dir, name), lambda f, t=text: f.write(t), text=True)
    _plot(report, os.path.join(out_dir, "report.png"))
