"""How much faster is a training step than with another install of the package?

Times the main job's training steps on ml-100k (the teacher by default) under two Python
interpreters, each with its own install of spnn_fast (e.g. a virtual environment of an older
commit), in alternating subprocesses, so that both meet the same machine load. Each subprocess
sets up the process as ``spnn-fast train`` does (fixed threads; the heap kept for reuse where the
install has it), builds the model and its trainer, runs ``--warm`` steps untimed, then times
``--steps`` steps; the report is the median steps per second of each side over ``--rounds``
rounds and their ratio.

    python experiments/step_speed.py --base OLD_VENV/bin/python --new .venv/bin/python \\
        --model teacher --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import torch
from spnn_fast import _threads
_threads.fix_threads(int(sys.argv[2]))
if hasattr(_threads, "retain_freed_memory"):
    _threads.retain_freed_memory()
from spnn_fast import data
from spnn_fast.config import ExperimentConfig
from spnn_fast.model import SPNN
from spnn_fast.train import Trainer
name, warm, steps, source = sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ds = data.load(source)
cfg = ExperimentConfig(dataset=source)
torch.manual_seed(0)
model = SPNN(cfg.model_configs(ds)[name], ds.item_features, ds.user_features)
teacher = None
if name == "student_kd":
    teacher = SPNN(cfg.model_configs(ds)["teacher"], ds.item_features, ds.user_features)
trainer = Trainer(model, ds, cfg.train_configs()[name], teacher=teacher, seed=0)
torch.manual_seed(1)
model.train()
def epochs():
    epoch = 0
    while True:  # a small log holds fewer batches than the steps asked for
        yield from trainer._batches(epoch)
        epoch += 1
batches = epochs()
for _ in range(warm):
    trainer.step(*next(batches))
t0 = time.perf_counter()
for _ in range(steps):
    trainer.step(*next(batches))
import spnn_fast
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0), "package": spnn_fast.__file__}))
"""


def _run(python: str, args) -> float:
    # run outside any checkout: python -c puts the working directory first on sys.path, and a
    # spnn_fast folder there would shadow the interpreter's own install
    out = subprocess.run(
        [python, "-c", _CHILD, args.model, str(args.threads), str(args.warm), str(args.steps),
         args.data],
        capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {python}: spnn_fast from {row['package']}", flush=True)
    return row["steps_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the Python of the install to compare with")
    p.add_argument("--new", default=sys.executable, help="the Python of this install")
    p.add_argument("--model", default="teacher", choices=("teacher", "student", "student_kd"))
    p.add_argument("--data", default="ml-100k", help="a data set name or path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)
    rates = {"base": [], "new": []}
    for r in range(args.rounds):
        for side in ("base", "new") if r % 2 == 0 else ("new", "base"):
            rates[side].append(_run(getattr(args, side), args))
            print(f"round {r}: {side} {rates[side][-1]:.2f} steps/s", flush=True)
    base, new = statistics.median(rates["base"]), statistics.median(rates["new"])
    print(json.dumps({"model": args.model, "threads": args.threads, "rounds": args.rounds,
                      "steps": args.steps, "base_steps_per_s": base, "new_steps_per_s": new,
                      "ratio": new / base, "base_all": rates["base"], "new_all": rates["new"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
