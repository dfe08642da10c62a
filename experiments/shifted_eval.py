"""Validation or test: which part of a split does a model do well on, its input or its target?

Evaluates the selected checkpoints of ``spnn-fast train`` runs on the validation and test splits
and on two shifted ones, each pairing one split's targets with an input that ends one event
earlier:

- ``test_from_valid_input``: each user's test target (event n-1) ranked from the events before
  n-2, the validation input, which is itself a training window's input;
- ``valid_from_shorter_input``: each user's validation target (event n-2) ranked from the events
  before n-3.

A model that is better on validation because it has fitted the validation input would also be
better on the first; one that is better at the validation targets themselves, on the second::

    spnn-fast train --out runs/stride10
    spnn-fast train --window-stride 0 --out runs/no_overlap
    python experiments/shifted_eval.py runs/no_overlap runs/stride10

One JSON line per run (named by its folder), seed and model (NDCG@10 of each split), then each
run's means per model.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from spnn_fast.data import load
from spnn_fast.evaluation import evaluate
from spnn_fast.experiment import MODELS
from spnn_fast.protocol import EvalSet, eval_sets
from spnn_fast.runfolder import load_checkpoint


def splits(log) -> dict:
    s = eval_sets(log, ("valid", "test"))
    valid, test = s["valid"], s["test"]
    ok = valid.ends >= 2  # users with 3 events have no event before their second-last but one
    return {
        "valid": valid,
        "test": test,
        "test_from_valid_input": EvalSet(test.rows, test.ends - 1, test.targets),
        "valid_from_shorter_input": EvalSet(valid.rows[ok], valid.ends[ok] - 1, valid.targets[ok]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders written by spnn-fast train")
    ap.add_argument("--seeds", type=int, default=None, help="only each run's first N seeds")
    args = ap.parse_args(argv)
    data = {}
    for run in args.runs:
        with open(os.path.join(run, "run.json")) as f:
            cfg = json.load(f)["config"]
        if cfg["dataset"] not in data:
            ds = load(cfg["dataset"])
            data[cfg["dataset"]] = (ds.log, splits(ds.log))
        log, sets = data[cfg["dataset"]]
        label = os.path.basename(os.path.normpath(run))
        rows = []
        for seed in range(min(cfg["seeds"], args.seeds or cfg["seeds"])):
            for name in MODELS:
                model, _ = load_checkpoint(os.path.join(run, f"seed{seed}", name, "best.pt"))
                row = {"run": label, "seed": seed, "model": name}
                row.update(
                    {k: round(evaluate(model, log, e)["NDCG@10"], 5) for k, e in sets.items()}
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        for name in MODELS:
            mine = [r for r in rows if r["model"] == name]
            means = {k: round(float(np.mean([r[k] for r in mine])), 5) for k in sets}
            print(json.dumps({"run": label, "model": name, "seeds": len(mine), "mean": means}))


if __name__ == "__main__":
    main()
