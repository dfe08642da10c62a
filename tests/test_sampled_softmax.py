"""The sampled softmax losses and the negative sampler: the chunked torch path and the Triton
kernels against the float64 reference that forms the ``[N, 1 + K]`` logits
(spnn_fast.reference.sampled_softmax), the full cross-entropy when the negatives are the whole
catalogue, and NegativeSampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import DEVICE

from spnn_fast.sampling import NegativeSampler

IGNORE = -100

# --- the negative sampler ---------------------------------------------------------------------

# 99.9% quantiles of the chi-square distribution by degrees of freedom.
CHI2_999 = {7: 24.32, 9: 27.88}
COUNTS = [0, 5, 1, 0, 3, 10, 2, 7, 1, 4]  # class 0 = padding, class 3 never seen


def _chi2(ids: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the drawn ids against ``probs``, over the classes with p > 0."""
    obs = torch.bincount(ids, minlength=len(probs)).double()
    exp = probs.double() * len(ids)
    keep = probs > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


@pytest.mark.parametrize("power", [1.0, 0.75, 0.0])
def test_sampler_follows_counts(power):
    sampler = NegativeSampler(10, torch.tensor(COUNTS), power=power)
    ids = sampler.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (100_000,)
    c = torch.tensor(COUNTS, dtype=torch.float64)
    want = torch.where(c > 0, c**power, torch.zeros_like(c))
    want /= want.sum()
    torch.testing.assert_close(sampler.probs, want)
    assert torch.bincount(ids, minlength=10)[[0, 3]].tolist() == [0, 0]  # padding, count 0
    assert _chi2(ids, want) < CHI2_999[7]
    # The statistic has the power to see a wrong distribution: the same draws against the
    # counts under another power are rejected.
    other = torch.where(c > 0, c ** (0.5 if power != 0.5 else 1.0), torch.zeros_like(c))
    assert _chi2(ids, other / other.sum()) > 10 * CHI2_999[7]


def test_sampler_uniform_skips_padding():
    for padding_idx in (0, 4, 9, None):
        sampler = NegativeSampler(10, padding_idx=padding_idx)
        ids = sampler.sample(50_000, generator=torch.Generator().manual_seed(1))
        probs = torch.full((10,), 0.1, dtype=torch.float64)
        if padding_idx is not None:
            probs.fill_(1 / 9)
            probs[padding_idx] = 0
            assert not (ids == padding_idx).any()
        torch.testing.assert_close(sampler.probs, probs)
        assert _chi2(ids, probs) < CHI2_999[9 if padding_idx is None else 7]


def test_sampler_log_q():
    sampler = NegativeSampler(10, COUNTS, power=0.75)  # a list is taken too
    assert sampler.log_q.dtype == torch.float32 and sampler.log_q.shape == (10,)
    assert sampler.log_q[0] == -math.inf and sampler.log_q[3] == -math.inf
    c = torch.tensor(COUNTS, dtype=torch.float64) ** 0.75
    want = (c / c[1:].sum()).log()
    want[0] = -math.inf
    torch.testing.assert_close(sampler.log_q, want.float())
    assert torch.isclose(sampler.log_q.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    uniform = NegativeSampler(5)
    assert torch.equal(uniform.log_q, torch.tensor([-math.inf] + [math.log(0.25)] * 4))
    # A count on the padding row is ignored; huge counts and powers do not overflow.
    big = NegativeSampler(3, torch.tensor([1e300, 1e300, 1e299], dtype=torch.float64), power=3.0)
    assert torch.isfinite(big.log_q[1:]).all() and big.log_q[0] == -math.inf


def test_sampler_is_deterministic_and_on_device():
    sampler = NegativeSampler(1000, torch.arange(1000) % 7, power=0.5)
    a = sampler.sample(513, generator=torch.Generator().manual_seed(3))
    b = sampler.sample(513, generator=torch.Generator().manual_seed(3))
    c = sampler.sample(513, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a % 7 == 0).any()  # zero counts (and the padding row 0)
    assert sampler.sample(3, device=DEVICE).device.type == DEVICE.type
    one = NegativeSampler(2)  # one class besides padding
    assert torch.equal(one.sample(4), torch.ones(4, dtype=torch.int64))
    assert "counts ** 0.5" in repr(sampler)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
        (dict(num_classes=2.0), TypeError, "num_classes must be an int"),
        (dict(num_classes=1), ValueError, "no class to draw: every class is padding"),
        (dict(num_classes=5, padding_idx=5), ValueError, r"padding_idx must be in \[0, num_"),
        (dict(num_classes=5, padding_idx=-1), ValueError, "padding_idx must be >= 0"),
        (dict(num_classes=3, counts=[1, 2]), ValueError, r"real \[num_classes=3\] tensor"),
        (dict(num_classes=3, counts=[[1, 2, 3]]), ValueError, r"real \[num_classes=3\]"),
        (dict(num_classes=3, counts=torch.tensor([True, False, True])), ValueError, "real"),
        (dict(num_classes=3, counts=[0, 1, -2]), ValueError, r"counts\[2\] = -2"),
        (dict(num_classes=3, counts=[0, 1, float("nan")]), ValueError, "finite and >= 0"),
        (dict(num_classes=3, counts=[0, float("inf"), 1]), ValueError, "finite and >= 0"),
        (dict(num_classes=3, counts=[5, 0, 0]), ValueError, "every count is 0"),
        (dict(num_classes=3, counts="abc"), TypeError, "counts must be a tensor"),
        (dict(num_classes=3, counts=[0, 1, 1], power=-1.0), ValueError, "power must be"),
        (dict(num_classes=3, counts=[0, 1, 1], power=float("inf")), ValueError, "power must"),
    ],
)
def test_sampler_bad_input(kwargs, error, match):
    num_classes = kwargs.pop("num_classes")
    with pytest.raises(error, match=match):
        NegativeSampler(num_classes, **kwargs)


def test_sampler_bad_sample_arguments():
    sampler = NegativeSampler(5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sampler.sample(0)
    with pytest.raises(TypeError, match="k must be an int"):
        sampler.sample(2.5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sampler.sample(3, generator=0)
