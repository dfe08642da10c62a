"""Load an interaction log and recommend the top 10 items for every user, timed: the serving path
of ``spnn-fast recommend`` (``spnn_fast.recommend.recommend_users``) with the main job's teacher
shape (untrained: the time does not depend on the weights). It imports only what every version of
the package has, so two versions can be compared by running it under each one's environment::

    python benchmarks/load_and_recommend.py LOG.csv            # one JSON line

Prints the load and recommend seconds, the users served, the catalogue size and the peak RSS.
"""

import json
import resource
import sys
import time

import numpy as np
import torch

from spnn_fast import _threads, data
from spnn_fast.config import ExperimentConfig
from spnn_fast.model import SPNN
from spnn_fast.recommend import recommend_users


def main(path: str, threads: int = 2) -> dict:
    _threads.fix_threads(threads)
    t0 = time.perf_counter()
    ds = data.load(path)
    load_s = time.perf_counter() - t0
    cfg = ExperimentConfig(dataset=path)
    torch.manual_seed(0)
    model = SPNN(cfg.model_configs(ds)["teacher"], ds.item_features, ds.user_features).eval()
    rows = np.arange(ds.log.num_users)
    t0 = time.perf_counter()
    with torch.no_grad():
        served = sum(len(p) for p, _ in recommend_users(model, ds.log, rows, 10))
    return {
        "load_s": load_s,
        "recommend_s": time.perf_counter() - t0,
        "users": served,
        "items": ds.log.num_items,
        "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)))
