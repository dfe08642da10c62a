"""Does distillation pay, and which teacher should it learn from? Paired comparisons over seeds.

Reads the per-seed ``result.json`` files of finished ``spnn-fast train`` runs (no training, no
evaluation) and compares, seed by seed:

- in each run, the distilled student against the same seed's plain student;
- between runs (the first run is the reference), each run's distilled student against the
  reference run's for the same seed;
- in each run with a ``teacher_ensemble``, the ensemble teacher against every seed's teacher.

For each split (validation, test on all users, cold@3/5/10) and metric (NDCG@10, HR@10): the
mean difference over seeds, its paired standard error (the standard deviation of the per-seed
differences over the square root of the number of seeds), how many standard errors that is, and
the ratio of the means::

    spnn-fast train --seeds 6 --out runs/seed
    spnn-fast train --seeds 6 --kd-teacher ensemble --out runs/ensemble
    python experiments/paired.py runs/seed runs/ensemble --out paired.jsonl

One JSON line per comparison, split and metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os

SPLITS = ("valid", "test", "cold@3", "cold@5", "cold@10")
METRICS = ("NDCG@10", "HR@10")


def seed_results(run: str, model: str) -> dict[int, dict]:
    """{seed: metrics} of one model of a run folder, for every seed that has finished it."""
    out = {}
    for name in sorted(os.listdir(run)):
        path = os.path.join(run, name, model, "result.json")
        if name.startswith("seed") and name[4:].isdigit() and os.path.isfile(path):
            with open(path) as f:
                out[int(name[4:])] = json.load(f)["metrics"]
    return out


def paired(new: dict[int, dict], base: dict[int, dict], split: str, metric: str) -> dict:
    """Mean difference of ``new`` over ``base`` on the seeds both have, with its paired SE."""
    seeds = sorted(set(new) & set(base))
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs two seeds in common, got {seeds}")
    a = [new[s][split][metric] for s in seeds]
    b = [base[s][split][metric] for s in seeds]
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    return {
        "split": split,
        "metric": metric,
        "seeds": seeds,
        "new": mean_a,
        "base": mean_b,
        "ratio": mean_a / mean_b,
        "diff": mean,
        "se": se,
        "diff_over_se": mean / se if se > 0 else math.inf,
        "per_seed_diff": d,
    }


def comparisons(runs: list[str]) -> list[dict]:
    rows = []

    def add(what, new, base):
        for split in SPLITS:
            for metric in METRICS:
                rows.append({"comparison": what, **paired(new, base, split, metric)})

    ref = runs[0]
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        kd = seed_results(run, "student_kd")
        add(f"{name}: student_kd vs student", kd, seed_results(run, "student"))
        if run != ref:
            ref_name = os.path.basename(os.path.normpath(ref))
            add(f"{name} vs {ref_name}: student_kd", kd, seed_results(ref, "student_kd"))
        ens = os.path.join(run, "ensemble", "result.json")
        if os.path.isfile(ens):
            with open(ens) as f:
                metrics = json.load(f)["metrics"]
            teachers = seed_results(run, "teacher")
            add(f"{name}: teacher_ensemble vs teacher", dict.fromkeys(teachers, metrics), teachers)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders; the first is the reference")
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    rows = comparisons(args.runs)
    lines = [json.dumps(r) for r in rows]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    for r in rows:
        print(
            f"{r['comparison']:<45} {r['split']:<8} {r['metric']:<8} "
            f"{r['new']:.4f} / {r['base']:.4f} = {r['ratio']:.3f}x  "
            f"diff {r['diff']:+.4f} (se {r['se']:.4f}, {r['diff_over_se']:+.1f} se)"
        )


if __name__ == "__main__":
    main()
