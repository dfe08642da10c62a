"""topk_scores and target_rank against the full-score baselines in the same run.

One group per operation and configuration ``N x V`` (D = 64), ``k`` (top-k only) and dtype:

* ``spnn_fast[triton]`` (CUDA) or ``spnn_fast[torch]`` (elsewhere): the fused op
* ``naive_eager``: top-k: ``spnn_fast.reference.topk.topk_scores_naive``, ``torch.topk`` of the
  full ``h @ W.T``; rank: ``target_rank_reference``, the evaluation's ``ranks_from_scores`` of
  the full scores
* ``naive_compiled``: ``topk_scores_naive`` / ``target_rank_naive`` (the rank formula on the full
  scores: ``ranks_from_scores``'s data-dependent checks do not compile) under
  ``torch.compile(dynamic=True)``

The implementations of one group run one after the other, so that a shared machine's load moves
them together.

Each benchmark records ``peak_bytes`` (extra memory of one call, measured after a warm-up). A
baseline whose scores cannot fit is skipped with an ``OOM:`` reason: on the CPU the reason is
computed from its size against the available memory (nothing is allocated); on CUDA it is tried
and the out-of-memory error is reported.

Sizes: N in {4096, 16384}, V in {1e5, 1e6}, k in {10, 100} on CUDA. On the CPU (sized for a
2-core machine) only the goal shapes: N = 4096 with V = 1e5 for every implementation, and the
fused op alone at V = 1e6 (its baselines need 16 GB); ``SPNN_BENCH_FULL=1`` runs the whole grid.
``SPNN_BENCH_DTYPES`` (comma list) picks dtypes; default bfloat16 on CUDA, float32 on the CPU.
Smoke mode (``--benchmark-disable``): tiny sizes, no compile.
"""

from __future__ import annotations

import gc
import os

import _common
import pytest
import torch
from _common import device, peak_memory, record, sync
from bench_distill import _available_bytes, _release_cpu_heap

import spnn_fast.functional as SF
from spnn_fast.reference.topk import target_rank_naive, target_rank_reference, topk_scores_naive

D = 64
IMPLS = ("spnn_fast", "naive_eager", "naive_compiled")
OPS = ("topk", "target_rank")


def _sizes():
    if _common.SMOKE:
        return [(64, 500)]
    return [(n, v) for n in (4096, 16384) for v in (10**5, 10**6)]


def _ks(op):
    if op == "target_rank":
        return [None]
    return [10] if _common.SMOKE else [10, 100]


def _cases():
    return [(op, k) for op in OPS for k in _ks(op)]


def _inputs(n, v, dtype, dev):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g).to(dev, dtype)
    w = (torch.randn(v + 1, D, generator=g) * 0.1).to(dev, dtype)
    target = torch.randint(1, v + 1, (n,), generator=g).to(dev)
    return h, w, target


_COMPILED = {}


def _fn(impl: str, op: str, k):
    if impl == "spnn_fast":
        if op == "topk":
            return lambda h, w, t: SF.topk_scores(h, w, k)
        return lambda h, w, t: SF.target_rank(h, w, t)
    if op == "topk":
        base = lambda h, w, t: topk_scores_naive(h, w, k)
    else:
        base = lambda h, w, t: target_rank_reference(h, w, t)
    if impl == "naive_eager":
        return base
    if op == "target_rank":
        base = lambda h, w, t: target_rank_naive(h, w, t)
    if (op, k) not in _COMPILED:
        _COMPILED[op, k] = torch.compile(base, dynamic=True)
    return _COMPILED[op, k]


def _cpu_limit_reason(impl: str, n: int, v: int):
    if device().type != "cpu" or _common.SMOKE or os.environ.get("SPNN_BENCH_FULL") == "1":
        return None
    if n <= 4096 and (v <= 10**5 or impl == "spnn_fast"):
        return None
    return (
        f"CPU run limited to N=4096 with V=1e5 (+ the fused op at V=1e6) to stay tractable on a "
        f"small machine; N={n}, V={v} runs on the GPU (SPNN_BENCH_FULL=1 runs it here)"
    )


def _skip_reason(impl, n, v, dtype, dev):
    if impl == "naive_compiled" and _common.SMOKE:
        return "smoke mode: compile baseline skipped"
    if impl.startswith("naive") and dev.type == "cpu":
        need = n * (v + 1) * max(4, torch.finfo(dtype).bits // 8)
        have = _available_bytes(dev)
        if need > 0.8 * have:
            return (
                f"OOM: the baseline's N x (V + 1) scores need ~{need / 1e9:.1f} GB and "
                f"{have / 1e9:.0f} GB are available"
            )
    return _cpu_limit_reason(impl, n, v)


def _rounds(n, v, dev):
    work = n * v
    if dev.type == "cuda":
        return 10 if work <= 4096 * 10**5 else 5
    return 3 if work <= 4096 * 10**5 else 1


# The decorator nearest the function varies slowest: the implementations of a group run in a row.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", _common.dtypes(), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n, v", _sizes(), ids=lambda x: f"{x}")
@pytest.mark.parametrize("op, k", _cases(), ids=lambda x: f"{x}")
def test_topk_and_rank(benchmark, impl, op, k, n, v, dtype):
    dev = device()
    kk = f" k={k}" if k is not None else ""
    benchmark.group = f"{op} N={n} V={v} D={D}{kk} {str(dtype)[6:]}"
    reason = _skip_reason(impl, n, v, dtype, dev)
    if reason:
        pytest.skip(reason)
    h, w, target = _inputs(n, v, dtype, dev)
    fn = _fn(impl, op, k)

    def step():
        out = fn(h, w, target)
        sync(dev)
        return out

    try:
        step()  # warm-up: compilation, allocator, the op registration's first call
        if dev.type == "cpu":
            gc.collect()
            _release_cpu_heap()
        peak = peak_memory(step, dev)
        benchmark.pedantic(step, rounds=1 if _common.SMOKE else _rounds(n, v, dev), iterations=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"OOM: {impl} ran out of GPU memory at N={n}, V={v}")
    backend = "triton" if dev.type == "cuda" else "torch"
    name = f"spnn_fast[{backend}]" if impl == "spnn_fast" else impl
    record(
        benchmark,
        impl=name,
        baseline_of=None if impl == "spnn_fast" else "spnn_fast",
        peak_bytes=peak,
        op=op,
        n=n,
        v=v,
        d=D,
        k=k,
        dtype=str(dtype),
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    )
