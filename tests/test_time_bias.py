"""The C++ time-bias helpers of the attention's CPU path (spnn_fast._C.time_bias_mask /
time_bias_grad) against the torch definition in spnn_fast.reference.attention, and the
attention's torch path with and without them."""

from __future__ import annotations

import pytest
import torch
from _utils import assert_close

from spnn_fast import _ext
from spnn_fast.reference import attention as A
from spnn_fast.reference import time_bias_cpp as TB

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"spnn_fast._C did not load: {_ext.ERROR}")


def _times(B, L, g, huge=False):
    ts = torch.cumsum(torch.randint(0, 10**6, (B, L), generator=g), dim=1)
    if huge:  # unsorted, and gaps past float64's mantissa up to 2**62
        ts[:, ::3] = torch.randint(0, 2**62, (B, (L + 2) // 3), generator=g)
    return ts


def _want_mask(ts, km, tb, causal, r0, R, K):
    L = ts.shape[1]
    bias = A.bias_scores(ts, tb)[:, :, r0 : r0 + R, :K]
    allowed = A.admissible(L, km, causal, ts.device, rows=(r0, r0 + R), keys=K)
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("nb", [1, 2, 32, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("huge", [False, True])
def test_mask_is_the_definition(nb, causal, with_mask, huge):
    g = torch.Generator().manual_seed(nb)
    B, H, L = 3, 2, 13
    ts = _times(B, L, g, huge)
    km = torch.rand(B, L, generator=g) > 0.3 if with_mask else None
    tb = torch.randn(H, nb, generator=g)
    for r0, R in [(0, L), (4, 5), (12, 1)]:
        K = r0 + R if causal else L
        out = torch.empty(B, H, R, K)
        TB.bias_into(out, km, ts, tb, causal, r0, accumulate=False)
        assert torch.equal(out, _want_mask(ts, km, tb, causal, r0, R, K)), (r0, R)
        base = torch.randn(B, H, R, K, generator=g)
        acc = base.clone()
        TB.bias_into(acc, km, ts, tb, causal, r0, accumulate=True)
        assert torch.equal(acc, base + _want_mask(ts, km, tb, causal, r0, R, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("huge", [False, True])
def test_grad_histogram_is_bincount_and_thread_independent(dtype, huge, monkeypatch):
    g = torch.Generator().manual_seed(3)
    B, H, L, NB = 5, 3, 17, 32
    ts = _times(B, L, g, huge)
    ds = torch.randn(B, H, 6, L, generator=g, dtype=dtype)
    bucket = A._pair_buckets(ts[:, 4:10], ts, NB)
    want = torch.zeros(H, NB, dtype=torch.float64)
    A._add_bias_grad(want, ds.double(), bucket)
    got = []
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(TB, "num_threads", lambda work=0, threads=threads: threads)
        d = torch.zeros(H, NB, dtype=torch.float64)
        TB.add_bias_grad(d, ds, ts, 4)
        got.append(d)
    assert_close(got[0], want, "dbias", rtol=1e-12, atol=1e-12)
    assert all(torch.equal(x, got[0]) for x in got[1:])  # bitwise, any thread count


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda C, ts, out: C.time_bias_mask(ts[0], None, torch.zeros(2, 4).numpy(), True, 0,
                                             out, False, 1), "timestamps must be \\[B, L\\]"),
        (lambda C, ts, out: C.time_bias_mask(ts, None, torch.zeros(3, 4).numpy(), True, 0, out,
                                             False, 1), "time_bias must be \\[H, NB >= 1\\]"),
        (lambda C, ts, out: C.time_bias_mask(ts, None, torch.zeros(2, 4).numpy(), True, 5, out,
                                             False, 1), "rows \\[r0, r0 \\+ R\\) must lie"),
        (lambda C, ts, out: C.time_bias_mask(ts, torch.ones(2, 3, dtype=torch.bool).numpy(),
                                             torch.zeros(2, 4).numpy(), True, 0, out, False, 1),
         "key_mask must be \\[B, L\\]"),
        (lambda C, ts, out: C.time_bias_grad(ts, torch.zeros(2, 2, 9, 6).numpy(), 0, 4, 1),
         "rows \\[r0, r0 \\+ R\\) must lie"),
        (lambda C, ts, out: C.time_bias_grad(ts, torch.zeros(2, 2, 3, 6).numpy(), 0, 0, 1),
         "num_buckets must be >= 1"),
    ],
)  # fmt: skip
def test_helpers_check_what_they_read(call, match):
    ts = torch.zeros(2, 6, dtype=torch.int64).numpy()
    out = torch.empty(2, 2, 3, 6).numpy()
    with pytest.raises(ValueError, match=match):
        call(_ext.C, ts, out)


def test_a_non_contiguous_output_is_refused_not_copied():
    ts = torch.zeros(2, 6, dtype=torch.int64).numpy()
    out = torch.empty(2, 2, 6, 3).transpose(2, 3)
    with pytest.raises(TypeError):
        _ext.C.time_bias_mask(ts, None, torch.zeros(2, 4).numpy(), True, 0, out.numpy(), False, 1)


@pytest.mark.parametrize("L", [7, 50])
@pytest.mark.parametrize("mask", ["left", "right", "none"])
def test_attention_torch_path_is_the_same_without_the_helpers(L, mask, monkeypatch):
    from test_attention import make_inputs, run_op

    inputs = make_inputs(3, 2, L, 16, mask, True, seed=L, huge=True)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(5))
    out, grads = run_op(inputs, True, "torch", g)
    monkeypatch.setattr(_ext, "C", None)
    want, want_grads = run_op(inputs, True, "torch", g)
    assert_close(out, want, "out", atol=1e-6, rtol=1e-5)
    for name, a, e in zip(("dq", "dk", "dv", "dtime_bias"), grads, want_grads):
        assert_close(a, e, name, atol=1e-6, rtol=1e-5)
