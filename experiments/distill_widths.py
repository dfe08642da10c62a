"""Can a wider student take the ensemble's knowledge? Models of several widths distilled from the
ensemble of a finished run's teachers, against the same models trained plainly, seed by seed.

The average of a run's teachers scores above a single teacher; if a model of the teacher's size
distilled from that ensemble scored like the ensemble, it would give several models' quality at
one model's cost. For each width (default 24, 32, 48, 64; the teacher's layers from width 48 up,
the run's student layers below) and each seed of the run, the script runs

    spnn-fast distill RUN --width W --layers L --seed S --teachers all    (distilled)
    spnn-fast distill RUN --width W --layers L --seed S --teachers none   (plain)

skipping a model already finished (the command would reuse it anyway), and writes one JSON line
per seed, width and model (distilled, plain, the seed's teacher; the teachers' ensemble once,
with seed null): the validation, test (all users) and cold@3/5/10 NDCG@10 and HR@10, the
parameters and the training seconds (the ensemble's: its teachers' together). It prints per
width the paired difference distilled - plain and the ratios distilled / teacher and distilled /
ensemble (means over seeds of the per-seed ratio), each with its standard error over seeds::

    spnn-fast train --seeds 6 --out runs/six
    python experiments/distill_widths.py runs/six

Two copies of one run folder (``cp -r``) can measure different widths side by side (a run folder
takes one command at a time); ``--rows`` then merges their row files::

    python experiments/distill_widths.py runs/six_a --widths 24 64 --out a.jsonl &
    python experiments/distill_widths.py runs/six_b --widths 32 48 --out b.jsonl
    python experiments/distill_widths.py --rows a.jsonl b.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paired import paired  # noqa: E402  (experiments/paired.py, beside this script)

from spnn_fast.cli import main as spnn_fast  # noqa: E402
from spnn_fast.distill_record import default_name  # noqa: E402
from spnn_fast.runfolder import read_run_config  # noqa: E402

SPLITS = ("valid", "test", "cold@3", "cold@5", "cold@10")
METRICS = ("NDCG@10", "HR@10")
WIDTHS = (24, 32, 48, 64)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks/results/cpu/distill_widths.jsonl"


def _result(run: str, seed: int, model: str) -> dict:
    with open(os.path.join(run, f"seed{seed}", model, "result.json")) as f:
        return json.load(f)


def _row(result: dict, **fields) -> dict:
    row = dict(fields)
    for split in SPLITS:
        for metric in METRICS:
            row[f"{split}_{metric}"] = result["metrics"][split][metric]
    row["params"] = result["params"]
    row["train_seconds"] = result["train_seconds"]
    return row


def _mean_se(values: list) -> tuple:
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return mean, se


def measure(run: str, widths, seeds, heads, deep_from: int, threads) -> list:
    """Distil (where not done yet) and collect the rows."""
    cfg = read_run_config(run, "cpu")
    heads = cfg.student_heads if heads is None else heads
    rows = []
    for seed in seeds:
        t = _result(run, seed, "teacher")
        rows.append(_row(t, seed=seed, width=cfg.teacher_d, layers=cfg.teacher_layers,
                         heads=cfg.teacher_heads, model="teacher"))  # fmt: skip
    for width in widths:
        layers = cfg.teacher_layers if width >= deep_from else cfg.student_layers
        for seed in seeds:
            for teachers, model in (("all", "distilled"), ("none", "plain")):
                name = default_name(width, layers, heads, teachers)
                if not os.path.isfile(os.path.join(run, f"seed{seed}", name, "result.json")):
                    argv = ["distill", run, "--width", str(width), "--layers", str(layers),
                            "--heads", str(heads), "--seed", str(seed), "--teachers", teachers]  # fmt: skip
                    if threads is not None:
                        argv += ["--threads", str(threads)]
                    code = spnn_fast(argv)
                    if code != 0:
                        raise SystemExit(f"spnn-fast {' '.join(argv)} failed ({code})")
                rows.append(_row(_result(run, seed, name), seed=seed, width=width, layers=layers,
                                 heads=heads, model=model))  # fmt: skip
    with open(os.path.join(run, "ensemble", "result.json")) as f:
        ens = _row(json.load(f), seed=None, width=cfg.teacher_d, layers=cfg.teacher_layers,
                   heads=cfg.teacher_heads, model="ensemble")  # fmt: skip
    ens["train_seconds"] = sum(r["train_seconds"] for r in rows if r["model"] == "teacher")
    ens["seeds"] = list(seeds)
    return rows + [ens]


def summary(rows: list) -> list:
    """Per width, split and metric: distilled - plain (paired), distilled / teacher and
    distilled / ensemble (the mean over seeds of the per-seed ratio), each with its SE."""

    def by_seed(model, width=None):
        return {r["seed"]: {s: {m: r[f"{s}_{m}"] for m in METRICS} for s in SPLITS}
                for r in rows if r["model"] == model and width in (None, r["width"])}  # fmt: skip

    teacher = by_seed("teacher")
    (ens,) = [r for r in rows if r["model"] == "ensemble"]
    out = []
    for width in sorted({r["width"] for r in rows if r["model"] == "distilled"}):
        dist, plain = by_seed("distilled", width), by_seed("plain", width)
        for split in SPLITS:
            for metric in METRICS:
                p = paired(dist, plain, split, metric)
                over_t = paired(dist, teacher, split, metric)
                seeds = sorted(dist)
                vs_t = _mean_se([dist[s][split][metric] / teacher[s][split][metric] for s in seeds])
                vs_e = _mean_se([dist[s][split][metric] / ens[f"{split}_{metric}"] for s in seeds])
                out.append({"width": width, "split": split, "metric": metric, "seeds": seeds,
                            "distilled": p["new"], "plain": p["base"], "diff": p["diff"],
                            "se": p["se"], "teacher": over_t["base"],
                            "minus_teacher": over_t["diff"], "minus_teacher_se": over_t["se"],
                            "over_teacher": vs_t[0], "over_teacher_se": vs_t[1],
                            "over_ensemble": vs_e[0], "over_ensemble_se": vs_e[1]})  # fmt: skip
    return out


def merge(paths: list) -> list:
    """The rows of several saved files (runs that shared their teachers, each measuring some
    widths) as one: every (model, width, seed) once, the teachers' and the ensemble's rows from
    the first file that has them."""
    rows, seen = [], set()
    for path in paths:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                key = (row["model"], row["width"], row["seed"])
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
    return rows


def print_summary(rows: list) -> None:
    for s in summary(rows):
        print(f"width {s['width']:>3} {s['split']:<8} {s['metric']:<8} distilled {s['distilled']:.4f}"
              f" - plain {s['plain']:.4f} = {s['diff']:+.4f} (se {s['se']:.4f}); - teacher "
              f"{s['minus_teacher']:+.4f} (se {s['minus_teacher_se']:.4f}); / teacher "
              f"{s['over_teacher']:.3f}x (se {s['over_teacher_se']:.3f}); / ensemble "
              f"{s['over_ensemble']:.3f}x (se {s['over_ensemble_se']:.3f})")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "run", nargs="?", help="a finished spnn-fast train run folder (two seeds or more)"
    )
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: all the run's")
    p.add_argument("--heads", type=int, default=None, help="default: the run's student_heads")
    p.add_argument("--deep-from", type=int, default=48,
                   help="from this width up the models take the teacher's layers")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="default: the run's")
    p.add_argument("--rows", nargs="+", default=None, metavar="FILE",
                   help="instead of a run: merge these saved row files (copies of one run, "
                        "each measuring some widths) into --out and summarize them")  # fmt: skip
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON lines (default %(default)s)")
    args = p.parse_args(argv)
    if (args.run is None) == (args.rows is None):
        p.error("give a run folder or --rows FILE..., not both")
    if args.rows is not None:
        rows = merge(args.rows)
    else:
        cfg = read_run_config(args.run, "cpu")
        seeds = args.seeds if args.seeds is not None else range(cfg.seeds)
        rows = measure(args.run, args.widths, list(seeds), args.heads, args.deep_from, args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} rows: {args.out}")
    print_summary(rows)


if __name__ == "__main__":
    main()
