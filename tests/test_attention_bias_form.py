"""The first-launch check of the attention kernels' GPU form of the time bias: both forms on a
fixed probe tile, exact equality required; a difference (or a failure of the GPU form) warns
once per process and device and sends the launchers to the portable form there."""

from __future__ import annotations

import warnings

import pytest
import torch
from _utils import needs_triton

from spnn_fast.reference.time_bucket import time_bucket

pytestmark = needs_triton


@pytest.fixture()
def KA(monkeypatch):
    from spnn_fast.kernels import attention as KA

    KA._checked_form.cache_clear()
    KA._BIAS_FORMS.clear()
    yield KA
    KA._checked_form.cache_clear()
    KA._BIAS_FORMS.clear()


@pytest.mark.parametrize("nb", [5, 32, 54, 64])
def test_probe_tile_is_the_bucket_function(KA, nb):
    """The probe's portable form is the reference bucket and an exact copy of the table entry,
    on gaps of both signs around every power of two up to 2**62 and past 2**53."""
    t_i, t_j = KA._probe_tile(torch.device("cpu"))
    gaps = t_i[:, None] - t_j[None, :]
    assert int(gaps.abs().max()) == 2**62 + 2**61 and bool((gaps < 0).any())
    powers = {2**e for e in range(63)}
    seen = set(gaps.abs().flatten().tolist())
    assert all(p in seen and p - 1 in seen for p in powers), "a power of two or its neighbour"
    bucket, bias = KA._probe(torch.device("cpu"), nb, False)
    want = time_bucket(gaps.abs(), nb)
    assert torch.equal(bucket.long(), want)
    assert torch.equal(bias, (torch.arange(nb, dtype=torch.float32) * 1.25 - 7.0)[want])


def _fake_cuda_check(KA, monkeypatch, probe):
    """Run the check as on a GPU: the GPU form 'available', the probe replaced."""
    monkeypatch.setattr(KA, "fast_bias_form", lambda: True)
    monkeypatch.setattr(KA, "_probe", probe)


def test_a_difference_warns_once_and_takes_the_portable_form(KA, monkeypatch):
    calls = []

    def probe(device, nb, fast):
        calls.append((nb, fast))
        bucket = torch.zeros((64, 64), dtype=torch.int32)
        bias = torch.zeros((64, 64))
        if fast and nb == 64:
            bias[3, 5] = 1.0  # one entry of the GPU form differs
        return bucket, bias

    _fake_cuda_check(KA, monkeypatch, probe)
    dev = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"GPU form .* not used on cpu \(1 bias values of the "
                      r"probe differ at NB=64\); the kernels take the portable form"):  # fmt: skip
        assert KA.bias_form_on(dev) is False
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KA.bias_form_on(dev) is False  # remembered: no second check, no second warning
        assert KA._bias_form(64, dev)["FAST_BIAS"] is False
    assert len(calls) == n
    assert KA.bias_form_report(dev) == {
        "form": "portable",
        "why": "1 bias values of the probe differ at NB=64",
    }


def test_equal_forms_take_the_gpu_form_silently(KA, monkeypatch):
    same = lambda device, nb, fast: (torch.zeros((64, 64), dtype=torch.int32),
                                     torch.zeros((64, 64)))  # fmt: skip
    _fake_cuda_check(KA, monkeypatch, same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KA.bias_form_on(torch.device("cpu")) is True
    assert KA.bias_form_report(torch.device("cpu"))["form"] == "ptx"


def test_a_failing_gpu_form_is_reported_not_raised(KA, monkeypatch):
    def broken(device, nb, fast):
        if fast:
            raise RuntimeError("ptxas: unknown instruction")
        return torch.zeros((64, 64), dtype=torch.int32), torch.zeros((64, 64))

    _fake_cuda_check(KA, monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="the GPU form failed: RuntimeError: ptxas"):
        assert KA.bias_form_on(torch.device("cpu")) is False


def test_interpreter_takes_the_portable_form_without_a_check(KA, monkeypatch):
    monkeypatch.setattr(KA, "_probe", lambda *a: pytest.fail("no check under the interpreter"))
    monkeypatch.setattr(KA, "fast_bias_form", lambda: False)
    assert KA.bias_form_on(torch.device("cpu")) is False
    assert KA.bias_form_report(torch.device("cpu"))["form"] == "portable"
