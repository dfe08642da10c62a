"""Shared helpers of the benchmark suites: smoke mode, device, peak-memory measurement."""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Callable

import torch

# Set by conftest.pytest_configure: True under --benchmark-disable (tiny sizes, CI smoke run).
SMOKE = False


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtypes() -> list:
    """The dtypes a suite runs: ``SPNN_BENCH_DTYPES`` (a comma list of torch dtype names), else
    bfloat16 on CUDA and float32 elsewhere."""
    env = os.environ.get("SPNN_BENCH_DTYPES")
    if env:
        return [getattr(torch, name.strip()) for name in env.split(",") if name.strip()]
    return [torch.bfloat16] if device().type == "cuda" else [torch.float32]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], dev: torch.device) -> int | None:
    """Peak extra bytes allocated while ``fn()`` runs (its result is dropped afterwards).

    CUDA: the caching allocator's peak over the memory already allocated. CPU: the RSS
    high-water mark over the RSS before the call (Linux only; None elsewhere).
    """
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    if not os.path.exists("/proc/self/status") or not _reset_cpu_peak():
        return None
    base = _read_status_kib("VmRSS")
    out = fn()
    peak = _read_status_kib("VmHWM") - base
    del out
    return max(peak, 0) * 1024


def record(benchmark, *, impl: str, baseline_of: str | None = None, **info) -> None:
    """Tag a benchmark with its implementation name (``report.py`` computes ratios from it).

    With ``SPNN_BENCH_JSONL`` set, also append the result (group, impl, stats in seconds,
    extra_info) to that file as one JSON line at once: pytest-benchmark writes its JSON only when
    the session ends, so a run stopped by a time limit keeps what it measured.
    """
    benchmark.extra_info["impl"] = impl
    if baseline_of is not None:
        benchmark.extra_info["baseline_of"] = baseline_of
    benchmark.extra_info.update(info)
    path = os.environ.get("SPNN_BENCH_JSONL")
    meta = getattr(benchmark, "stats", None)
    if not path or meta is None:  # no file asked for, or --benchmark-disable (nothing timed)
        return
    stats = meta.stats
    row = {
        "group": benchmark.group,
        "name": benchmark.name,
        "impl": impl,
        "stats": {k: getattr(stats, k) for k in ("min", "median", "mean", "stddev", "rounds")},
        "extra_info": dict(benchmark.extra_info),
    }
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def adaptive_rounds(run: Callable[[], object], dev: torch.device, *, budget_s: float = 2.0,
                    low: int = 3, high: int = 20) -> int:  # fmt: skip
    """Rounds for ``benchmark.pedantic``: as many as fit in ``budget_s`` (one timed call of
    ``run``, already warm, sets the pace), between ``low`` and ``high``. Slow baselines get few
    rounds, so a whole suite stays inside a time limit; fast kernels get many."""
    sync(dev)
    t0 = time.perf_counter()
    run()
    sync(dev)
    return max(low, min(high, int(budget_s / max(time.perf_counter() - t0, 1e-9))))
