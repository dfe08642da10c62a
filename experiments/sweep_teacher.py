"""Teacher-only sweeps: train the main job's teacher under configuration overrides, over seeds.

The main job's hyperparameters are chosen on validation NDCG@10 from runs like these; the teacher
alone trains in about a minute per seed on a 2-core CPU, a third of a full ``spnn-fast train``
seed. Each run prints one JSON line (validation and test NDCG@10 of the selected epoch, cold@k
test NDCG@10, best epoch, seconds), then each configuration's means over its seeds::

    python experiments/sweep_teacher.py --seeds 0 1 2 3 4 5 \\
        --config '{"max_len": 50}' --config '{"max_len": 20}' --out sweep.jsonl

A configuration is a JSON object of :class:`spnn_fast.config.ExperimentConfig` fields, plus
optional ``"model"`` / ``"train"`` objects of :class:`spnn_fast.model.SPNNConfig` /
:class:`spnn_fast.config.TrainConfig` fields applied to the teacher on top. The seeds match the main
job's: a teacher here is the teacher of ``spnn-fast train`` with the same configuration and seed.
The teacher's dropout is ``"teacher_dropout"``; ``"dropout"`` alone is refused (it is the
students', and the teacher's only when ``"teacher_dropout"`` is null).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from spnn_fast.config import ExperimentConfig
from spnn_fast.data import Dataset, load
from spnn_fast.experiment import seed_model
from spnn_fast.model import SPNN
from spnn_fast.protocol import DEFAULT_SPLITS
from spnn_fast.train import Trainer


def run_teacher(overrides: dict, seed: int, ds: Dataset) -> dict:
    """One teacher run; ``ds`` is the data set that ``overrides`` names (loaded once per sweep)."""
    kw = dict(overrides)
    mkw, tkw = kw.pop("model", {}), kw.pop("train", {})
    cfg = ExperimentConfig(**kw)
    mcfg = dataclasses.replace(cfg.model_configs(ds)["teacher"], **mkw)
    tcfg = dataclasses.replace(cfg.train_configs()["teacher"], **tkw)
    seed_model(seed, "teacher")
    model = SPNN(mcfg, ds.item_features, ds.user_features)
    t0 = time.perf_counter()
    result = Trainer(model, ds, tcfg, seed=seed, device=cfg.device).fit(None, log=lambda s: None)
    return {
        "config": overrides,
        "seed": seed,
        **{f"{s}_NDCG@10": round(result["metrics"][s]["NDCG@10"], 5) for s in DEFAULT_SPLITS},
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="JSON",
        help="overrides (repeat for several configurations; default: the defaults)",
    )
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    configs = []
    for text in args.config or ["{}"]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            ap.error(f"--config {text!r} is not JSON: {e}")
        if not isinstance(obj, dict):
            ap.error(f"--config {text!r} must be a JSON object")
        if "dropout" in obj and "teacher_dropout" not in obj:
            ap.error(f"--config {text!r}: \"dropout\" is the students' (the teacher's only when "
                     f"\"teacher_dropout\" is null); set \"teacher_dropout\" to sweep the teacher's")  # fmt: skip
        configs.append(obj)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = {}
    for overrides in configs:
        name = overrides.get("dataset", ExperimentConfig.dataset)
        if name not in datasets:
            datasets[name] = load(name)
        rows = []
        for seed in args.seeds:
            row = run_teacher(overrides, seed, datasets[name])
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
        means = {k: round(float(np.mean([r[k] for r in rows])), 5)
                 for k in rows[0] if k.endswith("NDCG@10")}  # fmt: skip
        print(json.dumps({"config": overrides, "seeds": args.seeds, "mean": means}), flush=True)


if __name__ == "__main__":
    main()
