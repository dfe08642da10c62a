"""Semantic attention on the CPU at the model's shapes: the torch path against the baseline a
user would otherwise write, in the same loop, forward and forward + backward.

Baselines (spnn_fast.reference.attention_baselines): without a time bias, SDPA with the padding
and causality as one boolean mask; with one, SDPA with the bias and the mask as one float mask
(autograd gives the bias its gradient). Shapes: B, H, L, D over head dims 12 to 64 and lengths
30 to 1000, each with left, right and no padding (left padding leaves rows with no admissible
key). Medians of interleaved repeats; one JSON line per shape, mode and padding, and the list
in ``OUT``::

    python benchmarks/attention_cpu_grid.py OUT.json   # about 5 minutes on 2 cores
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from spnn_fast.functional import semantic_attention
from spnn_fast.reference.attention_baselines import (
    semantic_attention_sdpa,
    semantic_attention_sdpa_bool,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_attention import make_inputs  # noqa: E402  (the tests' inputs)

torch.set_num_threads(int(os.environ.get("T", "2")))


def bench(B, H, L, D, bias, mask_kind, reps=5):
    inp = make_inputs(B, H, L, D, mask_kind, bias, seed=0)

    def leaves():
        return {
            k: (
                v.detach().clone().requires_grad_(True)
                if (v is not None and v.is_floating_point())
                else v
            )
            for k, v in inp.items()
        }

    def ours(bwd):
        x = leaves()
        o = semantic_attention(**x, causal=True, backend="torch")
        if bwd:
            o.sum().backward()

    def base(bwd):
        x = leaves()
        if bias:
            o = semantic_attention_sdpa(
                x["q"], x["k"], x["v"], x["key_mask"], True, x["timestamps"], x["time_bias"]
            )
        else:
            o = semantic_attention_sdpa_bool(x["q"], x["k"], x["v"], x["key_mask"], True)
        if bwd:
            o.sum().backward()

    res = {}
    for bwd in (False, True):
        r = {"ours": [], "base": []}
        with torch.set_grad_enabled(bwd):
            for f in (ours, base):
                f(bwd)
            for _ in range(reps):
                for name, f in (("ours", ours), ("base", base)):
                    t0 = time.perf_counter()
                    f(bwd)
                    r[name].append(time.perf_counter() - t0)
        mo, mb = statistics.median(r["ours"]) * 1e3, statistics.median(r["base"]) * 1e3
        res["fwd+bwd" if bwd else "fwd"] = (mo, mb, mb / mo)
    return res


configs = [
    (256, 2, 30, 12),
    (256, 2, 50, 32),
    (256, 2, 200, 64),
    (256, 2, 200, 12),
    (16, 2, 1000, 64),
    (1024, 4, 50, 32),
    (256, 1, 30, 24),
]
out = []
for B, H, L, D in configs:
    for bias in (False, True):
        for mk in ("left", "right", "none"):
            r = bench(B, H, L, D, bias, mk)
            for mode, (mo, mb, ratio) in r.items():
                row = dict(
                    B=B,
                    H=H,
                    L=L,
                    D=D,
                    bias=bias,
                    padding=mk,
                    mode=mode,
                    ours_ms=round(mo, 2),
                    baseline_ms=round(mb, 2),
                    ratio=round(ratio, 3),
                )
                out.append(row)
                print(json.dumps(row), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
