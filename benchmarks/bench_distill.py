"""distillation_loss, forward + backward, against its baselines in the same run.

One group per configuration ``N x V`` (D = 64 for student and teacher), ``alpha`` and dtype:

* ``spnn_fast[triton]`` (CUDA) or ``spnn_fast[torch]`` (elsewhere): the fused loss
* ``naive_eager``: ``spnn_fast.reference.distill.distillation_loss_reference`` (forms the logits)
* ``naive_compiled``: the same function under ``torch.compile(dynamic=True)`` (one compile per
  alpha and dtype, reused across shapes)
* ``liger_flce``: Liger-Kernel's fused linear cross-entropy, alpha = 0 only, CUDA only, when
  ``liger_kernel`` is installed (it is not a dependency)
* ``torch_lce``, ``torch_lce_chunked``: PyTorch's own ``linear_cross_entropy`` (alpha = 0 only,
  where the installed torch has it): its reference path (``options=None``, which forms the
  logits) and its chunked path (``LinearCrossEntropyOptions()``, its automatic choice)

Each benchmark records ``peak_bytes`` (extra memory of one step, measured after a warm-up). A
baseline whose logits cannot fit is skipped with an ``OOM:`` reason: on the CPU the reason is
computed from its size against the available memory (nothing is allocated); on CUDA it is tried
and the out-of-memory error is reported.

Sizes: N in {4096, 16384}, V in {1e4, 1e5, 1e6} on CUDA. On the CPU (slow, and sized for a 2-core
machine) only N = 4096 with V <= 1e5, plus the fused path alone at V = 1e6, alpha = 0; set
``SPNN_BENCH_FULL=1`` for the whole grid. ``SPNN_BENCH_DTYPES`` (comma list, e.g.
``bfloat16,float32``) picks dtypes; default bfloat16 on CUDA, float32 on the CPU.
Smoke mode (``--benchmark-disable``): tiny sizes, no compile.

``test_distillation_loss_ensemble``: the loss from M = 3 teachers (D = 64 each), alpha = 0.5, per
``ensemble``: "distributions" runs the ensemble op (the chunked torch path on every device);
"logits" is one concatenated teacher of width 3 x 64 = 192, within the kernels' limit, so it
runs the Triton kernels on CUDA. Baseline ``naive_eager``:
``spnn_fast.reference.distill_ensemble.distillation_loss_ensemble_reference`` (forms every
teacher's logits). Sizes: N = 4096 with V = 1e4 (and 1e5 on CUDA).
"""

from __future__ import annotations

import ctypes
import gc
import os

import _common
import pytest
import torch
from _common import device, peak_memory, record, sync

import spnn_fast.functional as SF
from spnn_fast.reference.distill import distillation_loss_reference
from spnn_fast.reference.distill_ensemble import distillation_loss_ensemble_reference

D = 64
ALPHAS = (0.0, 0.5)
IMPLS = ("spnn_fast", "naive_eager", "naive_compiled", "liger_flce", "torch_lce",
         "torch_lce_chunked")  # fmt: skip
# N x V fp32 buffers the naive version holds at its peak (measured on the CPU at N=4096,
# V=1e5: 4.7 GB for alpha = 0, 12.5 GB for alpha = 0.5).
_NAIVE_BUFFERS = {False: 3, True: 8}


def _sizes():
    if _common.SMOKE:
        return [(64, 500)]
    return [(n, v) for n in (4096, 16384) for v in (10**4, 10**5, 10**6)]


def _available_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**62


def _cpu_limit_reason(impl: str, n: int, v: int, alpha: float):
    if device().type != "cpu" or _common.SMOKE or os.environ.get("SPNN_BENCH_FULL") == "1":
        return None
    if n <= 4096 and v <= 10**5:
        return None
    if impl == "spnn_fast" and n <= 4096 and alpha == 0.0:
        return None
    return (
        f"CPU run limited to N=4096, V<=1e5 (+ the fused path at V=1e6, alpha=0) to stay "
        f"tractable on a small machine; N={n}, V={v}, alpha={alpha} runs on the GPU "
        f"(SPNN_BENCH_FULL=1 runs it here)"
    )


def _inputs(n, v, dtype, dev):
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dev, dtype)
    hs = mk(n, D).requires_grad_()
    ws = mk(v, D, scale=0.1).requires_grad_()
    ht, wt = mk(n, D), mk(v, D, scale=0.1)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    y[::17] = -100
    return hs, ws, ht, wt, y


_COMPILED = {}


def _loss_fn(impl: str, alpha: float, dtype: torch.dtype):
    kw = dict(temperature=2.0, alpha=alpha)
    if impl == "spnn_fast":
        return lambda hs, ws, ht, wt, y: SF.distillation_loss(hs, ws, ht, wt, y, **kw)
    if impl == "naive_eager":
        return lambda hs, ws, ht, wt, y: distillation_loss_reference(hs, ws, ht, wt, y, **kw)
    if impl == "naive_compiled":
        key = (alpha, dtype)
        if key not in _COMPILED:
            fn = lambda hs, ws, ht, wt, y: distillation_loss_reference(hs, ws, ht, wt, y, **kw)
            _COMPILED[key] = torch.compile(fn, dynamic=True)
        return _COMPILED[key]
    if impl.startswith("torch_lce"):
        import torch.nn.functional as F

        options = torch.nn.LinearCrossEntropyOptions() if impl == "torch_lce_chunked" else None
        return lambda hs, ws, ht, wt, y: F.linear_cross_entropy(hs, ws, y, options=options)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def liger(hs, ws, ht, wt, y):
        out = liger_fused_linear_cross_entropy(hs, ws, y)
        return out[0] if isinstance(out, tuple) else out

    return liger


def _skip_reason(impl, n, v, alpha, dtype, dev):
    if impl.startswith("torch_lce"):
        if alpha != 0.0:
            return "PyTorch's linear_cross_entropy has no distillation term (alpha = 0 only)"
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no linear_cross_entropy"
    if impl == "liger_flce":
        if alpha != 0.0:
            return "Liger's fused linear cross-entropy has no distillation term (alpha = 0 only)"
        if dev.type != "cuda":
            return "Liger-Kernel runs on CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed (optional baseline)"
    if impl == "naive_compiled" and _common.SMOKE:
        return "smoke mode: compile baseline skipped"
    if impl in ("naive_eager", "naive_compiled", "torch_lce") and dev.type == "cpu":
        need = _NAIVE_BUFFERS[alpha > 0] * n * v * 4
        have = _available_bytes(dev)
        if need > 0.8 * have:
            return (
                f"OOM: the naive version needs ~{need / 1e9:.0f} GB ({_NAIVE_BUFFERS[alpha > 0]} "
                f"N x V fp32 buffers) and {have / 1e9:.0f} GB are available"
            )
    return _cpu_limit_reason(impl, n, v, alpha)


def _release_cpu_heap() -> None:
    """Hand freed heap pages back to the OS, so that the RSS-based peak of the next step is not
    hidden by memory an earlier step left in the allocator (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rounds(n, v, dev):
    work = n * v
    if dev.type == "cuda":
        return 10 if work <= 4096 * 10**5 else 5
    return 5 if work <= 4096 * 10**4 else (3 if work <= 4096 * 10**5 else 1)


@pytest.mark.parametrize("dtype", _common.dtypes(), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n, v", _sizes(), ids=lambda x: f"{x}")
@pytest.mark.parametrize("impl", IMPLS)
def test_distillation_loss(benchmark, impl, n, v, alpha, dtype):
    dev = device()
    benchmark.group = f"distillation_loss N={n} V={v} D={D} alpha={alpha} {str(dtype)[6:]}"
    reason = _skip_reason(impl, n, v, alpha, dtype, dev)
    if reason:
        pytest.skip(reason)
    hs, ws, ht, wt, y = _inputs(n, v, dtype, dev)
    fn = _loss_fn(impl, alpha, dtype)

    def step():
        hs.grad = ws.grad = None
        loss = fn(hs, ws, ht, wt, y)
        loss.backward()
        sync(dev)
        return loss

    try:
        step()  # warm-up: compilation, allocator
        if dev.type == "cpu":
            gc.collect()
            _release_cpu_heap()
        peak = peak_memory(step, dev)
        benchmark.pedantic(step, rounds=1 if _common.SMOKE else _rounds(n, v, dev), iterations=1)
    except torch.cuda.OutOfMemoryError:
        hs.grad = ws.grad = None
        torch.cuda.empty_cache()
        pytest.skip(f"OOM: {impl} ran out of GPU memory at N={n}, V={v}, alpha={alpha}")
    backend = "triton" if dev.type == "cuda" else "torch"
    name = f"spnn_fast[{backend}]" if impl == "spnn_fast" else impl
    record(
        benchmark,
        impl=name,
        baseline_of=None if impl == "spnn_fast" else "spnn_fast",
        peak_bytes=peak,
        n=n,
        v=v,
        d=D,
        alpha=alpha,
        dtype=str(dtype),
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    )


ENSEMBLE_M = 3


@pytest.mark.parametrize("ensemble", ("distributions", "logits"))
@pytest.mark.parametrize(
    "n, v",
    [(64, 500)] if _common.SMOKE else [(4096, 10**4)] + [(4096, 10**5)] * (device().type == "cuda"),
    ids=lambda x: f"{x}",
)  # fmt: skip
@pytest.mark.parametrize("impl", ("spnn_fast", "naive_eager"))
def test_distillation_loss_ensemble(benchmark, impl, n, v, ensemble):
    dev, dtype = device(), _common.dtypes()[0]
    benchmark.group = (
        f"distillation_loss ensemble={ensemble} M={ENSEMBLE_M} N={n} V={v} D={D} alpha=0.5 "
        f"{str(dtype)[6:]}"
    )
    hs, ws, _, _, y = _inputs(n, v, dtype, dev)
    g = torch.Generator().manual_seed(1)  # teachers that differ from each other
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dev, dtype)
    hts = [mk(n, D) for _ in range(ENSEMBLE_M)]
    wts = [mk(v, D, scale=0.1) for _ in range(ENSEMBLE_M)]
    fn = SF.distillation_loss if impl == "spnn_fast" else distillation_loss_ensemble_reference

    def step():
        hs.grad = ws.grad = None
        loss = fn(hs, ws, hts, wts, y, temperature=2.0, alpha=0.5, ensemble=ensemble)
        loss.backward()
        sync(dev)
        return loss

    step()
    if dev.type == "cpu":
        gc.collect()
        _release_cpu_heap()
    peak = peak_memory(step, dev)
    benchmark.pedantic(step, rounds=1 if _common.SMOKE else 3, iterations=1)
    backend = "triton" if dev.type == "cuda" and ensemble == "logits" else "torch"
    name = f"spnn_fast[{backend}]" if impl == "spnn_fast" else impl
    record(
        benchmark, impl=name, baseline_of=None if impl == "spnn_fast" else "spnn_fast",
        peak_bytes=peak, n=n, v=v, d=D, m=ENSEMBLE_M, ensemble=ensemble, alpha=0.5,
        dtype=str(dtype), device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    )  # fmt: skip
