"""The sampled softmax losses, forward + backward, against their baselines in the same run.

One group per configuration ``N x K x V`` (D = 64), loss and dtype; the negatives are drawn by
``NegativeSampler`` from popularity counts (power 0.75) and the loss takes its ``log_q``:

* ``spnn_fast[triton]`` (CUDA) or ``spnn_fast[torch]`` (elsewhere): ``sampled_softmax_loss``
  (``loss=ce``) or ``sampled_distillation_loss`` at alpha = 0.5 (``loss=kd``, a teacher of the
  same width)
* ``formed_logits``: ``spnn_fast.reference.sampled_softmax`` (the same loss from the formed
  ``[N, 1 + K]`` logits, eager): what the sampled loss costs written plainly
* ``full_catalogue``: the loss over the whole catalogue at the same N, D, V, the package's fused
  path: ``linear_cross_entropy`` (``ce``) or ``distillation_loss`` (``kd``): what sampling saves

Each benchmark records ``peak_bytes`` (extra memory of one step, measured after a warm-up). On
the CPU a formed-logits baseline that cannot fit is skipped with an ``OOM:`` reason computed from
its size (nothing is allocated).

Sizes: N = 4096 with K in {1024, 8192} and V in {1e5, 1e6} on CUDA; on the CPU (slow, sized for
a small machine) K = 1024, V = 1e5 only, unless ``SPNN_BENCH_FULL=1``. ``SPNN_BENCH_DTYPES``
picks dtypes (default bfloat16 on CUDA, float32 on the CPU). Smoke mode
(``--benchmark-disable``): tiny sizes.
"""

from __future__ import annotations

import gc
import os

import _common
import pytest
import torch
from _common import device, peak_memory, record, sync

import spnn_fast.functional as SF
from spnn_fast.reference.sampled_softmax import (
    sampled_distillation_loss_reference,
    sampled_softmax_loss_reference,
)
from spnn_fast.sampling import NegativeSampler

D = 64
N = 4096
LOSSES = ("ce", "kd")
IMPLS = ("spnn_fast", "formed_logits", "full_catalogue")
# [N, 1 + K] buffers the formed-logits baseline holds at its peak (logits, softmaxes, grads).
_FORMED_BUFFERS = {"ce": 4, "kd": 10}


def _sizes():
    if _common.SMOKE:
        return [(64, 16, 500)]
    return [(N, k, v) for k in (1024, 8192) for v in (10**5, 10**6)]


def _skip_reason(impl, n, k, v, loss, dev):
    if impl == "formed_logits" and dev.type == "cpu" and os.path.exists("/proc/meminfo"):
        need = _FORMED_BUFFERS[loss] * n * (k + 1) * 4
        with open("/proc/meminfo") as f:
            have = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
        if need > 0.8 * have:
            return f"OOM: the formed logits need ~{need / 1e9:.1f} GB, {have / 1e9:.0f} GB free"
    full = _common.SMOKE or dev.type == "cuda" or os.environ.get("SPNN_BENCH_FULL") == "1"
    if not full and (k > 1024 or v > 10**5):
        return (
            f"CPU run limited to K=1024, V=1e5 to stay tractable on a small machine; K={k}, "
            f"V={v} runs on the GPU (SPNN_BENCH_FULL=1 runs it here)"
        )
    return None


def _inputs(n, k, v, dtype, dev):
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dev, dtype)
    h = mk(n, D).requires_grad_()
    w = mk(v + 1, D, scale=0.1).requires_grad_()  # row 0 = padding
    ht, wt = mk(n, D), mk(v + 1, D, scale=0.1)
    counts = torch.randint(1, 1000, (v + 1,), generator=g)
    sampler = NegativeSampler(v + 1, counts, power=0.75)
    neg = sampler.sample(k, generator=g).to(dev)
    y = torch.randint(1, v + 1, (n,), generator=g).to(dev)
    y[::17] = -100
    return h, w, ht, wt, y, neg, sampler.log_q.to(dev)


def _loss_fn(impl: str, loss: str):
    kd = dict(temperature=2.0, alpha=0.5)
    if impl == "spnn_fast" and loss == "ce":
        return lambda h, w, ht, wt, y, neg, lq: SF.sampled_softmax_loss(h, w, y, neg, log_q=lq)
    if impl == "spnn_fast":
        return lambda h, w, ht, wt, y, neg, lq: SF.sampled_distillation_loss(
            h, w, ht, wt, y, neg, log_q=lq, **kd
        )
    if impl == "formed_logits" and loss == "ce":
        return lambda h, w, ht, wt, y, neg, lq: sampled_softmax_loss_reference(
            h, w, y, neg, log_q=lq
        )
    if impl == "formed_logits":
        return lambda h, w, ht, wt, y, neg, lq: sampled_distillation_loss_reference(
            h, w, ht, wt, y, neg, log_q=lq, **kd
        )
    if loss == "ce":
        return lambda h, w, ht, wt, y, neg, lq: SF.linear_cross_entropy(h, w, y)
    return lambda h, w, ht, wt, y, neg, lq: SF.distillation_loss(h, w, ht, wt, y, **kd)


@pytest.mark.parametrize("dtype", _common.dtypes(), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n, k, v", _sizes(), ids=lambda x: f"{x}")
@pytest.mark.parametrize("impl", IMPLS)
def test_sampled_softmax(benchmark, impl, n, k, v, loss, dtype):
    dev = device()
    benchmark.group = f"sampled_softmax loss={loss} N={n} K={k} V={v} D={D} {str(dtype)[6:]}"
    reason = _skip_reason(impl, n, k, v, loss, dev)
    if reason:
        pytest.skip(reason)
    inputs = _inputs(n, k, v, dtype, dev)
    h, w = inputs[:2]
    fn = _loss_fn(impl, loss)

    def step():
        h.grad = w.grad = None
        out = fn(*inputs)
        out.backward()
        sync(dev)
        return out

    step()  # warm-up
    if dev.type == "cpu":
        gc.collect()
    peak = peak_memory(step, dev)
    benchmark.pedantic(step, rounds=1 if _common.SMOKE else 5, iterations=1)
    backend = "triton" if dev.type == "cuda" else "torch"
    name = f"spnn_fast[{backend}]" if impl == "spnn_fast" else impl
    record(
        benchmark, impl=name, baseline_of=None if impl == "spnn_fast" else "spnn_fast",
        peak_bytes=peak, n=n, k=k, v=v, d=D, loss=loss, dtype=str(dtype),
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    )  # fmt: skip
