"""encode_batch against its baselines, on a log of 10^7 events, B = 4096 rows, L = 200.

Per K (negatives per position, 0 and 10) one group holds:
  * ``spnn_fast[cpp]``   the C++ encoder with 1 thread and with every CPU (``threads`` in extra_info)
  * ``spnn_fast[torch]`` the vectorized numpy fallback (``spnn_fast.reference.encode``)
  * ``pad_sequence``     ``torch.nn.utils.rnn.pad_sequence`` over the same windows (items and
                         timestamps, plus the mask). It does less work: no buckets, targets or
                         negatives, and the per-row window tensors are sliced before timing.
  * ``copy_floor``       a plain ``Tensor.copy_`` of as many bytes as the encoder writes, into a
                         buffer allocated before timing: the memory-bandwidth floor.

Histories are 100..300 events (mean 200) and windows end within the last 20 events, so most
windows are full. Smoke mode (``--benchmark-disable``): 10^4 events, B = 64.
"""

from __future__ import annotations

import _common
import numpy as np
import pytest
import torch
from _common import peak_memory, record

from spnn_fast import _ext
from spnn_fast.encode import default_num_threads, encode_batch
from spnn_fast.reference.encode import pad_sequence_collate, window_slices

MAX_LEN = 200
NUM_ITEMS = 100_000
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workload():
    """The CSR log and the batch's rows, built once (vectorized) for the whole module."""
    smoke = _common.SMOKE
    num_events, batch = (10**4, 64) if smoke else (10**7, 4096)
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 301, num_events // 100 + 1)
    total = np.cumsum(lengths)
    cut = int(np.searchsorted(total, num_events))
    lengths = lengths[: cut + 1]
    lengths[-1] -= total[cut] - num_events  # exactly num_events events
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = rng.integers(1, NUM_ITEMS + 1, num_events)
    times = np.cumsum(rng.integers(0, 1 << 20, num_events)) + 1_600_000_000
    rows = rng.integers(0, len(lengths), batch)
    ends = rng.integers(np.maximum(1, lengths[rows] - 20), lengths[rows] + 1)
    return {"log": (offsets, items, times), "rows": rows, "ends": ends, "events": num_events}


def _bytes_written(batch: int, k: int) -> int:
    return batch * MAX_LEN * (4 * 8 + 1 + 8 * k)  # four int64 planes, the bool mask, negatives


def _impl(workload, impl: str, k: int):
    """(function to time, extra_info) for one implementation."""
    log, rows, ends = workload["log"], workload["rows"], workload["ends"]
    kw = dict(num_items=NUM_ITEMS, num_negatives=k, seed=0)
    if impl.startswith("spnn_fast[cpp]"):
        if _ext.C is None:
            pytest.skip("spnn_fast._C did not build")
        threads = 1 if impl.endswith("threads=1") else default_num_threads()
        fn = lambda: encode_batch(
            *log, rows, ends, MAX_LEN, backend="cpp", num_threads=threads, **kw
        )
        return fn, {"impl": "spnn_fast[cpp]", "threads": threads}
    if impl == "spnn_fast[torch]":
        fn = lambda: encode_batch(*log, rows, ends, MAX_LEN, backend="torch", **kw)
        return fn, {"impl": impl, "threads": 1}
    if impl == "pad_sequence":
        items, times = torch.from_numpy(log[1]), torch.from_numpy(log[2])
        slices = window_slices(log[0], rows, ends, MAX_LEN)
        item_windows, time_windows = [items[s] for s in slices], [times[s] for s in slices]
        fn = lambda: pad_sequence_collate(item_windows, time_windows)
        return fn, {"impl": impl, "baseline_of": "spnn_fast[cpp]", "threads": 1}
    if impl == "copy_floor":
        nbytes = _bytes_written(len(rows), k)
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.fill_(0)  # fault the pages in before timing
        fn = lambda: dst.copy_(src)
        return fn, {
            "impl": impl,
            "baseline_of": "spnn_fast[cpp]",
            "threads": torch.get_num_threads(),
        }
    raise AssertionError(impl)


IMPLS = [
    "spnn_fast[cpp]/threads=1",
    "spnn_fast[cpp]/threads=all",
    "spnn_fast[torch]",
    "pad_sequence",
    "copy_floor",
]
KS = [pytest.param(k, id=f"K{k}", marks=pytest.mark.benchmark(group=f"encode_batch K={k}")) for k in (0, 10)]  # fmt: skip


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_batch(benchmark, workload, impl, k):
    fn, info = _impl(workload, impl, k)
    if _ext.C is not None:
        _ext.C.release_cached_buffers()  # peak memory counts the output blocks once
    peak = peak_memory(fn, CPU)
    benchmark(fn)
    record(
        benchmark,
        **info,
        peak_bytes=peak,
        events=workload["events"],
        batch=len(workload["rows"]),
        max_len=MAX_LEN,
        num_negatives=k,
        bytes_written=_bytes_written(len(workload["rows"]), k),
        smoke=_common.SMOKE,
    )
