"""The sampled softmax losses and the negative sampler: the chunked torch path and the Triton
kernels against the float64 reference that forms the ``[N, 1 + K]`` logits
(spnn_fast.reference.sampled_softmax), the full cross-entropy when the negatives are the whole
catalogue, and NegativeSampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import DEVICE, assert_close

from spnn_fast.reference import sampled_softmax as ref
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


# --- inputs -------------------------------------------------------------------------------------


def make_inputs(n, k, c=50, d=24, dt=40, *, dtype=torch.float32, seed=0, ignore_frac=0.25,
                log_q=True, hits=True, lead=None):  # fmt: skip
    """Student/teacher rows and tables, targets (some ignored), negatives with accidental hits
    and duplicates (when ``hits``), and a popularity ``log_q`` (or None)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * (2 / math.sqrt(d))
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(c, dt, generator=g, dtype=torch.float64) * (2 / math.sqrt(dt))
    y = torch.randint(1, c, (n,), generator=g)
    neg = torch.randint(1, c, (k,), generator=g)
    if hits and n and k > 1:  # a target among the negatives, and a duplicated negative
        neg[0] = y[0]
        neg[-1] = neg[k // 2]
    y[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    lq = None
    if log_q:
        counts = torch.randint(1, 100, (c,), generator=g)
        lq = NegativeSampler(c, counts, power=0.75).log_q.double()
    cast = lambda t: t.to(dtype).to(DEVICE)
    out = dict(h=cast(h), w=cast(w), ht=cast(ht), wt=cast(wt), y=y.to(DEVICE),
               neg=neg.to(DEVICE), log_q=None if lq is None else lq.to(DEVICE))  # fmt: skip
    if lead is not None:
        for key in ("h", "ht"):
            out[key] = out[key].reshape(*lead, -1)
        out["y"] = out["y"].reshape(lead)
    return out


def to64(inp):
    return {
        k: (t.double() if t is not None and t.is_floating_point() else t) for k, t in inp.items()
    }


def ref_rows(inp, alpha=0.0, temperature=2.0, hits=True):
    """Row losses of the formed-logits reference (float64 inputs give float64)."""
    if alpha == 0:
        return ref.sampled_softmax_loss_reference(
            inp["h"], inp["w"], inp["y"], inp["neg"], log_q=inp["log_q"],
            remove_accidental_hits=hits, reduction="none",
        )  # fmt: skip
    return ref.sampled_distillation_loss_reference(
        inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"], inp["neg"], log_q=inp["log_q"],
        temperature=temperature, alpha=alpha, remove_accidental_hits=hits, reduction="none",
    )  # fmt: skip


# --- the reference: full cross-entropy when the negatives are the catalogue ------------------


@pytest.mark.parametrize("log_q", ["none", "constant"])
def test_reference_is_full_cross_entropy_over_the_catalogue(log_q):
    """Negatives = every class once, hits removed, a uniform log_q (or none): each row's
    candidates are the whole catalogue once, so the sampled losses are the full ones."""
    from spnn_fast.reference.distill import distillation_loss_reference

    inp = to64(make_inputs(33, 1, c=40, log_q=False))
    inp["neg"] = torch.randperm(40, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if log_q == "constant":
        inp["log_q"] = torch.full((40,), -3.7, dtype=torch.float64, device=DEVICE)
    full = torch.nn.functional.cross_entropy(
        inp["h"] @ inp["w"].T, inp["y"], ignore_index=IGNORE, reduction="none"
    )
    assert_close(ref_rows(inp), full, "sampled CE", rtol=1e-12, atol=1e-12)
    kd = distillation_loss_reference(inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"],
                                     temperature=3.0, alpha=0.5, reduction="none")  # fmt: skip
    assert_close(ref_rows(inp, 0.5, 3.0), kd, "sampled distillation", rtol=1e-12, atol=1e-12)


def test_reference_hits_and_correction():
    """An accidental hit is dropped from its row only (or scored, without removal); log_q
    shifts every candidate's logit, the positive's included."""
    inp = to64(make_inputs(2, 3, c=10, ignore_frac=0.0, hits=False))
    inp["y"] = torch.tensor([4, 5], device=DEVICE)
    inp["neg"] = torch.tensor([4, 7, 7], device=DEVICE)
    lq = inp["log_q"]
    s = inp["h"] @ inp["w"].T - lq
    for hits in (True, False):
        rows = ref_rows(inp, hits=hits)
        row0 = [4, 7, 7] if hits else [4, 4, 7, 7]
        want = torch.stack([torch.logsumexp(s[0, row0], 0) - s[0, 4],
                            torch.logsumexp(s[1, [5, 4, 7, 7]], 0) - s[1, 5]])  # fmt: skip
        assert_close(rows, want, f"hits removed: {hits}", rtol=1e-12, atol=1e-12)


# --- the chunked torch path against the reference ---------------------------------------------


def chunked(inp, alpha=0.0, temperature=2.0, hits=True, rows=None):
    """(loss rows, d_h, d_w) of the chunked path for a random gradient on the rows."""
    args = (inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"], inp["neg"], inp["log_q"])
    out = ref.sampled_rows_chunked(*args, temperature, alpha, hits, IGNORE, rows=rows)
    g = torch.rand(len(inp["y"]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(out[0].dtype).to(DEVICE)
    grads = ref.sampled_rows_chunked_backward(g, *args, *out[1:], temperature, alpha, hits,
                                              IGNORE, rows=rows)  # fmt: skip
    return out[0], *grads, g


def autograd_ref(inp, g, alpha=0.0, temperature=2.0, hits=True):
    inp = dict(inp, h=inp["h"].clone().requires_grad_(), w=inp["w"].clone().requires_grad_())
    (ref_rows(inp, alpha, temperature, hits) * g).sum().backward()
    return inp["h"].grad, inp["w"].grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("log_q", [True, False])
@pytest.mark.parametrize("hits", [True, False])
@pytest.mark.parametrize("n, k, d", [(1, 1, 8), (7, 5, 24), (129, 130, 64), (7, 130, 8),
                                     (129, 1, 24), (1, 130, 64)])  # fmt: skip
def test_chunked_matches_reference(n, k, d, hits, log_q, alpha):
    inp = to64(make_inputs(n, k, d=d, seed=n + k + d, log_q=log_q))
    for rows in (None, 4):  # whole, and chunks that do not divide N
        loss, d_h, d_w, g = chunked(inp, alpha, 1.7, hits, rows)
        assert_close(loss, ref_rows(inp, alpha, 1.7, hits), "loss", rtol=1e-11, atol=1e-12)
        e_h, e_w = autograd_ref(inp, g, alpha, 1.7, hits)
        assert_close(d_h, e_h, "d_hidden", rtol=1e-11, atol=1e-12)
        assert_close(d_w, e_w, "d_items", rtol=1e-11, atol=1e-12)


def test_chunk_rows_bounds():
    for n, k in [(1, 1), (10**6, 8192), (300, 7), (5, 10**7)]:
        rows = ref.chunk_rows(n, k, 4)
        assert 1 <= rows <= n
        assert rows == 1 or rows * k * 4 * ref._N_TEMPS <= ref._distill.LOGIT_BUDGET_BYTES
    assert ref.chunk_rows(4096, 1000, 4) == 4096  # small problems stay whole
