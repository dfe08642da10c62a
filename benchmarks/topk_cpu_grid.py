"""Top-k and target rank on the CPU over catalogues of 10^3 to 10^6 items: the torch path
against ``matmul`` + mask + ``torch.topk`` (and the rank's compare-and-count over the full scores),
in the same loop: 943 users (ml-100k's), 64 dims, k = 10, each user with up to 200 excluded
items. Medians of interleaved repeats (31 below 10^7 scores, 7 above)::

    python benchmarks/topk_cpu_grid.py   # about 3 minutes on 2 cores
"""

import json
import os
import statistics
import time

import torch

import spnn_fast.functional as SF

torch.set_num_threads(int(os.environ.get("T", "2")))


def run(N, V, D=64, k=10, seen=100, reps=None):
    reps = reps or (31 if N * V < 10**7 else 7)  # small calls: more repeats against the noise
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V + 1, D, generator=g)
    lens = torch.randint(1, seen * 2, (N,), generator=g)
    offsets = torch.zeros(N + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    ids = torch.randint(1, V + 1, (int(offsets[-1]),), generator=g)
    target = torch.randint(1, V + 1, (N,), generator=g)

    def ours_topk():
        return SF.topk_scores(h, W, k, exclude=(offsets, ids), backend="torch")

    def base_topk():
        s = h @ W.T
        s[:, 0] = float("-inf")
        rows = torch.repeat_interleave(torch.arange(N), lens)
        s[rows, ids] = float("-inf")
        return torch.topk(s, k)

    def ours_rank():
        return SF.target_rank(h, W, target, backend="torch")

    def base_rank():
        s = h @ W.T
        s[:, 0] = float("-inf")
        t = s.gather(1, target[:, None])
        return (s > t).sum(1) + 1

    for name, (a, b) in {"topk": (ours_topk, base_topk), "rank": (ours_rank, base_rank)}.items():
        r = {"ours": [], "base": []}
        a()
        b()
        for _ in range(reps):
            for n, f in (("ours", a), ("base", b)):
                t0 = time.perf_counter()
                f()
                r[n].append(time.perf_counter() - t0)
        mo, mb = statistics.median(r["ours"]) * 1e3, statistics.median(r["base"]) * 1e3
        row = {"op": name, "N": N, "V": V, "ours_ms": round(mo, 3), "baseline_ms": round(mb, 3),
               "ratio": round(mb / mo, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)


for N, V in [
    (943, 1000),
    (943, 1682),
    (943, 10_000),
    (943, 100_000),
    (4096, 100_000),
    (943, 1_000_000),
]:
    run(N, V)
