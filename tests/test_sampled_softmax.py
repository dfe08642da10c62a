"""The sampled softmax losses and the negative sampler: the chunked torch path and the Triton
kernels against the float64 reference that forms the ``[N, 1 + K]`` logits
(spnn_fast.reference.sampled_softmax), the full cross-entropy when the negatives are the whole
catalogue, and NegativeSampler's distribution."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _utils import (
    DEVICE,
    KERNEL_STATS,
    assert_close,
    check_compiled,
    load_kernel_stats,
    needs_triton,
)

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


def test_sampler_reads_python_floats_as_float64():
    # a list of floats holds float64 values: read as float32, 1e-50 would become 0 (a class never
    # drawn), 1e39 inf, and 2**24 + 1 would lose its last digit
    for counts in ([0, 1e-50, 1.0], [0, 1e39, 1.0], [0, 2.0**24 + 1, 2.0**24]):
        got = NegativeSampler(3, counts).probs
        want = NegativeSampler(3, torch.tensor(counts, dtype=torch.float64)).probs
        assert torch.equal(got, want), counts
    assert NegativeSampler(3, [0, 1e-50, 1.0]).probs[1] > 0


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


# --- the public functions ---------------------------------------------------------------------


def call(fn_name, inp, **kw):
    """``SF.sampled_softmax_loss`` (alpha absent) or ``SF.sampled_distillation_loss``."""
    import spnn_fast.functional as SF

    if fn_name == "ce":
        return SF.sampled_softmax_loss(inp["h"], inp["w"], inp["y"], inp["neg"],
                                       log_q=inp["log_q"], **kw)  # fmt: skip
    return SF.sampled_distillation_loss(inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"],
                                        inp["neg"], log_q=inp["log_q"], **kw)  # fmt: skip


def reference_call(fn_name, inp, **kw):
    """The formed-logits reference of :func:`call`, on the flattened rows."""
    flat = dict(inp, h=inp["h"].reshape(-1, inp["h"].shape[-1]), y=inp["y"].reshape(-1).long(),
                ht=inp["ht"].reshape(-1, inp["ht"].shape[-1]))  # fmt: skip
    kw.pop("backend", None)
    reduction = kw.get("reduction", "mean")
    if fn_name == "ce":
        out = ref.sampled_softmax_loss_reference(flat["h"], flat["w"], flat["y"], flat["neg"],
                                                 log_q=flat["log_q"], **kw)  # fmt: skip
    else:
        out = ref.sampled_distillation_loss_reference(
            flat["h"], flat["w"], flat["ht"], flat["wt"], flat["y"], flat["neg"],
            log_q=flat["log_q"], **kw,
        )  # fmt: skip
    return out.reshape(inp["y"].shape) if reduction == "none" else out


def run_loss(fn, inp, *, out_sum=False, **kw):
    """Forward + backward; (loss, d_h, d_w) in float64 on the CPU."""
    inp = dict(inp, h=inp["h"].detach().clone().requires_grad_(),
               w=inp["w"].detach().clone().requires_grad_())  # fmt: skip
    out = fn(inp, **kw)
    if out.dim() == 0 or out_sum:
        out.sum().backward()
    else:
        go = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * go.to(out.dtype).to(out.device)).sum().backward()
    return out.detach().double().cpu(), inp["h"].grad.double().cpu(), inp["w"].grad.double().cpu()


def check_against_reference(fn_name, inp, backend, rtol=1e-4, atol=1e-5, **kw):
    got = run_loss(lambda i, **k: call(fn_name, i, **k), inp, backend=backend, **kw)
    want = run_loss(lambda i, **k: reference_call(fn_name, i, **k), to64(inp), **kw)
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, f"{backend} {fn_name} {kw} {name}", rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("log_q", [True, False])
@pytest.mark.parametrize("n, k, d", [(1, 1, 8), (7, 5, 24), (129, 130, 64), (129, 5, 8)])
def test_sampled_softmax_loss_torch(n, k, d, log_q, reduction):
    inp = make_inputs(n, k, d=d, seed=n * k + d, log_q=log_q)
    check_against_reference("ce", inp, "torch", reduction=reduction)
    check_against_reference("ce", inp, "torch", reduction=reduction,
                            remove_accidental_hits=False)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 1.0), (0.5, 4.0), (1.0, 2.0)])
@pytest.mark.parametrize("n, k, d", [(1, 1, 8), (7, 130, 24), (129, 5, 64)])
def test_sampled_distillation_loss_torch(n, k, d, alpha, temperature, reduction):
    inp = make_inputs(n, k, d=d, seed=n * k + d)
    check_against_reference("kd", inp, "torch", alpha=alpha, temperature=temperature,
                            reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("fn_name", ["ce", "kd"])
def test_leading_shapes_and_integer_targets(fn_name):
    inp = make_inputs(12, 7, lead=(3, 4))
    kw = dict(reduction="none", backend="torch")
    shaped = call(fn_name, inp, **kw)
    assert shaped.shape == (3, 4)
    flat = call(fn_name, dict(inp, h=inp["h"].reshape(12, -1), ht=inp["ht"].reshape(12, -1),
                              y=inp["y"].reshape(12)), **kw)  # fmt: skip
    assert torch.equal(shaped.reshape(-1), flat)
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(call(fn_name, dict(inp, y=inp["y"].to(dtype)), **kw), shaped)
    assert torch.equal(call(fn_name, dict(inp, neg=inp["neg"].int()), **kw), shaped)
    check_against_reference(fn_name, inp, "torch", reduction="none")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("fn_name", ["ce", "kd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(fn_name, reduction, backend):
    """No counted row: zero gradients; the mean is NaN for the cross-entropy (as
    F.cross_entropy's) and 0 for the distillation loss (as distillation_loss's)."""
    inp = make_inputs(9, 6)
    inp["y"][:] = IGNORE
    loss, d_h, d_w = run_loss(lambda i, **k: call(fn_name, i, **k), inp, reduction=reduction,
                              backend=backend)  # fmt: skip
    if fn_name == "ce" and reduction == "mean":
        want = torch.nn.functional.cross_entropy(torch.zeros(9, 5), inp["y"].cpu())
        assert torch.isnan(want) and torch.isnan(loss)
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(d_h, torch.zeros_like(d_h)) and torch.equal(d_w, torch.zeros_like(d_w))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("fn_name", ["ce", "kd"])
def test_empty_batch(fn_name, backend):
    inp = make_inputs(0, 5)
    for reduction in ("sum", "none"):
        loss, d_h, d_w = run_loss(lambda i, **k: call(fn_name, i, **k), inp, reduction=reduction,
                                  backend=backend)  # fmt: skip
        assert loss.numel() in (0, 1) and torch.all(loss == 0)
        assert d_h.shape == (0, 24) and torch.equal(d_w, torch.zeros_like(d_w))


def test_full_catalogue_through_the_public_functions():
    """Negatives = every class once and log_q uniform: sampled_softmax_loss is
    linear_cross_entropy, sampled_distillation_loss is distillation_loss (torch path)."""
    import spnn_fast.functional as SF

    inp = make_inputs(33, 1, c=40, log_q=False)
    inp["neg"] = torch.randperm(40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    inp["log_q"] = torch.full((40,), math.log(1 / 40), device=DEVICE)
    got = run_loss(lambda i, **k: call("ce", i, **k), inp, backend="torch")
    want = run_loss(lambda i, **k: SF.linear_cross_entropy(i["h"], i["w"], i["y"], **k), inp,
                    backend="torch")  # fmt: skip
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, f"CE {name}")
    got = run_loss(lambda i, **k: call("kd", i, **k), inp, temperature=3.0, backend="torch")
    want = run_loss(lambda i, **k: SF.distillation_loss(i["h"], i["w"], i["ht"], i["wt"], i["y"],
                                                        **k), inp, temperature=3.0,
                    backend="torch")  # fmt: skip
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, f"distillation {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_torch_path_dtypes(dtype):
    inp = make_inputs(33, 40, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-2)
    check_against_reference("ce", inp, "torch", reduction="sum", **tol)
    check_against_reference("kd", inp, "torch", reduction="sum", **tol)
    out = call("ce", inp, backend="torch")
    assert out.dtype == dtype  # cross_entropy's: the logits' dtype
    assert call("kd", inp, backend="torch").dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )


def test_autocast_like_linear_cross_entropy():
    """Under CPU autocast the dot products run in bfloat16 (the inputs cast, as linear's) and
    the loss is float32, as linear_cross_entropy's; float64 is left alone."""
    import spnn_fast.functional as SF

    inp = make_inputs(17, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call("ce", inp, backend="torch")
        lce = SF.linear_cross_entropy(inp["h"], inp["w"], inp["y"], backend="torch")
        kd = call("kd", inp, backend="torch")
        f64 = call("ce", to64(inp), backend="torch")
    assert got.dtype == lce.dtype == kd.dtype == torch.float32 and f64.dtype == torch.float64
    bf16 = dict(inp, h=inp["h"].bfloat16(), w=inp["w"].bfloat16(), ht=inp["ht"].bfloat16(),
                wt=inp["wt"].bfloat16())  # fmt: skip
    # The same rows as from bfloat16 inputs, in float32 (the distillation loss at alpha 0 is the
    # sampled cross-entropy in float32 whatever the inputs).
    assert torch.equal(got, call("kd", bf16, alpha=0.0, backend="torch"))
    assert torch.equal(kd, call("kd", bf16, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_teacher_and_log_q_get_no_gradient(backend):
    inp = make_inputs(9, 6)
    ht = inp["ht"].clone().requires_grad_()
    wt = inp["wt"].clone().requires_grad_()
    lq = inp["log_q"].clone().requires_grad_()
    h = inp["h"].clone().requires_grad_()
    call("kd", dict(inp, h=h, ht=ht, wt=wt, log_q=lq), backend=backend).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert ht.grad is None and wt.grad is None and lq.grad is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backward_with_expanded_grad(backend):
    """``out.sum().backward()`` hands the op a stride-0 gradient."""
    inp = make_inputs(33, 20)
    got = run_loss(lambda i, **k: call("kd", i, **k), inp, reduction="none", out_sum=True,
                   backend=backend)  # fmt: skip
    want = run_loss(lambda i, **k: reference_call("kd", i, **k), to64(inp), reduction="none",
                    out_sum=True)  # fmt: skip
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, name)


def test_gradcheck_torch_path(monkeypatch):
    import spnn_fast.functional as SF
    from spnn_fast.reference import distill

    # A tiny budget forces chunks of one row through the public functions.
    monkeypatch.setattr(distill, "LOGIT_BUDGET_BYTES", 8 * ref._N_TEMPS * 7)
    assert ref.chunk_rows(5, 7, 8) == 1
    inp = to64(make_inputs(5, 7, c=11, d=3, dt=4, ignore_frac=0.0, seed=2))
    y = inp["y"].clone()
    y[1] = IGNORE
    for alpha, reduction in [(0.5, "none"), (0.0, "mean"), (1.0, "sum")]:
        f = lambda h, w, alpha=alpha, reduction=reduction: SF.sampled_distillation_loss(
            h, w, inp["ht"], inp["wt"], y, inp["neg"], log_q=inp["log_q"], temperature=1.5,
            alpha=alpha, reduction=reduction, backend="torch",
        )  # fmt: skip
        h = inp["h"].clone().requires_grad_()
        w = inp["w"].clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (h, w))
    g = lambda h, w: SF.sampled_softmax_loss(h, w, y, inp["neg"], log_q=inp["log_q"],
                                             reduction="sum", backend="torch")  # fmt: skip
    h = inp["h"].clone().requires_grad_()
    w = inp["w"].clone().requires_grad_()
    assert torch.autograd.gradcheck(g, (h, w))


# --- Triton kernels (the interpreter on the CPU: fp32, small sizes) ---------------------------

TRITON_CASES = [
    # fn, n, k, d, alpha, log_q, hits, reduction
    ("ce", 1, 1, 8, 0.0, True, True, "mean"),
    ("ce", 7, 5, 24, 0.0, False, True, "none"),
    ("ce", 129, 130, 64, 0.0, True, False, "sum"),
    ("ce", 129, 5, 8, 0.0, True, True, "none"),
    ("kd", 7, 130, 24, 0.5, True, True, "none"),
    ("kd", 129, 1, 8, 0.5, False, True, "mean"),
    ("kd", 1, 130, 64, 1.0, True, False, "sum"),
    ("kd", 129, 5, 24, 1.0, True, True, "none"),
]


@needs_triton
@pytest.mark.parametrize("fn_name, n, k, d, alpha, log_q, hits, reduction", TRITON_CASES)
def test_triton_matches_reference(fn_name, n, k, d, alpha, log_q, hits, reduction):
    inp = make_inputs(n, k, d=d, seed=n + k + d, log_q=log_q)
    kw = dict(reduction=reduction, remove_accidental_hits=hits)
    if fn_name == "kd":
        kw.update(alpha=alpha, temperature=3.0)
    check_against_reference(fn_name, inp, "triton", **kw)


@needs_triton
@pytest.mark.parametrize("d, dt", [(1, 256), (256, 17)])
def test_triton_hidden_sizes(d, dt):
    inp = make_inputs(9, 37, d=d, dt=dt)
    check_against_reference("kd", inp, "triton", temperature=2.0, alpha=0.5, reduction="sum")


@needs_triton
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [(16, 16), (32, 64)])
def test_triton_tile_edges(block, alpha):
    """Row and negative tiles that do not divide N and K; the backward takes the forward's
    d_hidden and d_positive, or recomputes them."""
    from spnn_fast.kernels import sampled_softmax as K

    inp = make_inputs(37, 45, c=30, d=20, dt=33)
    args = (inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"], inp["neg"],
            inp["log_q"].float(), 3.0, alpha, True, IGNORE)  # fmt: skip
    loss, *stats, d_rows, d_pos = K.sampled_softmax_fwd(*args, block=block)
    args64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in args]  # fmt: skip
    want = ref.sampled_rows_chunked(*args64)
    counted = inp["y"] != IGNORE  # (an ignored row's statistics may be anything finite)
    needed = {"loss": True, "lse_s": alpha < 1, "lse_sT": alpha > 0, "lse_tT": alpha > 0}
    for name, a, e in zip(("loss", "lse_s", "lse_sT", "lse_tT"), (loss, *stats), want):
        if needed[name]:
            assert_close(a[counted], e[counted], name)
    g = torch.rand(37, dtype=torch.float32, device=DEVICE)
    e_h, e_w = ref.sampled_rows_chunked_backward(g.double(), *args64[:7], *want[1:], *args64[7:])
    for given in ((d_rows, d_pos), (None, None)):
        d_h, d_w = K.sampled_softmax_bwd(g, *args[:7], *stats, *args[7:], block=block,
                                         d_hidden_rows=given[0], d_positive=given[1])  # fmt: skip
        assert_close(d_h, e_h, "d_hidden")
        assert_close(d_w, e_w, "d_items")


@needs_triton
def test_scatter_rows_sums_duplicates_in_order():
    from spnn_fast.kernels.sampled_softmax import scatter_rows

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 24, generator=g).to(DEVICE)
    ids = torch.randint(0, 40, (300,), generator=g).to(DEVICE)
    ids[:50] = 7  # a long run
    out = scatter_rows(rows, ids, 45, torch.float32)
    want = torch.zeros(45, 24, dtype=torch.float64).index_add_(0, ids.cpu(), rows.double().cpu())
    assert_close(out, want, "scatter", rtol=1e-6, atol=1e-6)
    assert torch.equal(out, scatter_rows(rows, ids, 45, torch.float32))  # bitwise the same
    assert torch.equal(out[40:], torch.zeros_like(out[40:]))  # no candidate: 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 4.0), (1.0, 1.0)])
def test_large_logits_stable(backend, alpha, temperature):
    """Logits spanning +-1e4: finite, and equal to the float64 reference up to fp32 rounding."""
    inp = make_inputs(33, 60, c=70, seed=5)
    scale = 1e4 / (inp["h"].double() @ inp["w"].double().T).abs().max()
    inp["h"] = (inp["h"].double() * scale).float()
    inp["ht"] = (inp["ht"].double() * scale).float()
    kw = dict(alpha=alpha, temperature=temperature, reduction="none")
    got = run_loss(lambda i, **k: call("kd", i, **k), inp, backend=backend, **kw)
    want = run_loss(lambda i, **k: reference_call("kd", i, **k), to64(inp), **kw)
    assert want[0].abs().max() > 100  # the case really is extreme
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, f"{backend} {name}", rtol=1e-3, atol=1e-4)


@needs_triton
def test_triton_rejects_what_it_cannot_run():
    inp = make_inputs(3, 5, d=300)
    with pytest.raises(ValueError, match="<= 256"):
        call("ce", inp, backend="triton")
    inp = make_inputs(3, 5, dt=300)
    with pytest.raises(ValueError, match="<= 256, got 300"):
        call("kd", inp, backend="triton")
    assert call("ce", inp, backend="triton").dtype == torch.float32  # no teacher read
    inp = to64(make_inputs(3, 5))
    with pytest.raises(ValueError, match="float64"):  # backend names are case-insensitive
        call("ce", inp, backend="TRITON")


def test_auto_picks_torch_on_cpu(monkeypatch):
    from spnn_fast import backends

    inp = {k: (t.cpu() if t is not None else t) for k, t in make_inputs(5, 9).items()}
    want = call("kd", inp, backend="torch")
    assert torch.equal(call("kd", inp, backend="auto"), want)
    monkeypatch.setenv(backends.ENV_VAR, "cpp")  # a backend this op lacks: falls back to auto
    assert torch.equal(call("kd", inp), want)


# --- bad input ----------------------------------------------------------------------------------


def _bad_cases():
    inp = make_inputs(4, 3, c=6, ignore_frac=0.0, hits=False)
    inp["y"] = torch.tensor([1, 2, 3, IGNORE], device=DEVICE)
    inp["neg"] = torch.tensor([1, 4, 5], device=DEVICE)
    lq = inp["log_q"].clone()
    lq[0] = -math.inf  # the padding row: fine while no counted target or negative is 0
    inp["log_q"] = lq
    h, w, y, neg = inp["h"], inp["w"], inp["y"], inp["neg"]
    inf_at = lambda i, v: lq.clone().index_fill_(0, torch.tensor([i], device=DEVICE), v)
    shared = [
        ({"neg": neg.float()}, ValueError, "negatives must be an integer tensor"),
        ({"neg": neg.bool()}, ValueError, "negatives must be an integer tensor"),
        ({"neg": neg[:0]}, ValueError, r"negatives must be 1-D \[K >= 1\]"),
        ({"neg": neg[None]}, ValueError, r"negatives must be 1-D"),
        ({"neg": torch.tensor([1, 6], device=DEVICE)}, ValueError, r"negatives holds 6, outside"),
        ({"neg": torch.tensor([-1, 2], device=DEVICE)}, ValueError, r"outside \[0, C=6\)"),
        ({"neg": neg.to("meta")}, ValueError, "different devices"),
        ({"y": torch.tensor([1, 2, 6, 0], device=DEVICE)}, ValueError, r"outside \[0, V=6\)"),
        ({"y": y.float()}, ValueError, "integer tensor of class indices"),
        ({"y": y[:3]}, ValueError, r"leading shape \(4,\)"),
        ({"log_q": lq[:5]}, ValueError, r"log_q must be a float tensor \[C=6\]"),
        ({"log_q": lq.long()}, ValueError, "log_q must be a float tensor"),
        ({"log_q": inf_at(2, math.nan)}, ValueError, "log_q holds nan at class 2"),
        ({"log_q": inf_at(3, math.inf)}, ValueError, "log_q holds inf at class 3"),
        ({"log_q": inf_at(4, -math.inf)}, ValueError, r"-inf at negatives\[1\] = 4"),
        ({"log_q": inf_at(3, -math.inf)}, ValueError, "-inf at the target 3 of row 2"),
        ({"remove_accidental_hits": 1}, TypeError, "remove_accidental_hits must be a bool"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"ignore_index": 1.5}, ValueError, "ignore_index must be an int"),
        ({"ignore_index": 2**63}, ValueError, "ignore_index must be an int64, got 92233"),
        ({"ignore_index": -(2**70)}, ValueError, "ignore_index must be an int64"),
        ({"backend": "cpp"}, ValueError, "does not apply"),
        ({"backend": "cuda"}, ValueError, "not a backend"),
    ]
    ce = shared + [
        ({"w": w[:, :5]}, ValueError, r"weight must be \[C >= 1, D=24\]"),
        ({"w": w.double()}, ValueError, "differ in dtype"),
        ({"h": h[:, :0]}, ValueError, r"input must be \[\.\.\., D\] with D >= 1"),
        ({"h": h.int()}, ValueError, "input must be float16/bfloat16/float32/float64"),
        ({"h": h.to("meta")}, ValueError, "different devices"),
    ]
    kd = shared + [
        ({"w": w[:, :5]}, ValueError, "student_items must be"),
        ({"ht": inp["ht"][:3]}, ValueError, "teacher_hidden must be"),
        ({"wt": inp["wt"][:5]}, ValueError, "teacher_items must be"),
        ({"ht": [inp["ht"]], "wt": [inp["wt"]]}, ValueError, "takes one teacher"),
        ({"ht": None, "wt": None, "alpha": 0.5}, ValueError, "teacher_hidden and teacher_items"),
        ({"y": None}, ValueError, "target is required"),
        ({"neg": None}, ValueError, "negatives is required"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"alpha": 1.5}, ValueError, "alpha must be a number in"),
    ]
    return inp, ce, kd


@pytest.mark.parametrize("case", range(len(_bad_cases()[1])))
def test_sampled_softmax_loss_bad_input(case):
    inp, cases, _ = _bad_cases()
    change, error, match = cases[case]
    kw = {k: change.pop(k) for k in list(change) if k not in inp}
    with pytest.raises(error, match=match):
        call("ce", dict(inp, **change), **{"backend": "torch", **kw})


@pytest.mark.parametrize("case", range(len(_bad_cases()[2])))
def test_sampled_distillation_loss_bad_input(case):
    inp, _, cases = _bad_cases()
    change, error, match = cases[case]
    kw = {k: change.pop(k) for k in list(change) if k not in inp}
    with pytest.raises(error, match=match):
        call("kd", dict(inp, **change), **{"backend": "torch", **kw})


def test_log_q_minus_inf_at_ignored_rows_and_unused_classes_is_fine():
    """The sampler's log_q is -inf at the padding row: harmless where no counted target and no
    negative is that class (an ignored row's target may be anything)."""
    inp, _, _ = _bad_cases()
    got = run_loss(lambda i, **k: call("ce", i, **k), inp, backend="torch")
    want = run_loss(lambda i, **k: reference_call("ce", i, **k), to64(inp))
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, name)


# --- the registered op: opcheck and torch.compile ---------------------------------------------


def _op_args(backend, teacher=True, log_q=True):
    inp = make_inputs(9, 7, c=20, log_q=log_q)
    h = inp["h"].clone().requires_grad_()
    w = inp["w"].clone().requires_grad_()
    ht, wt = (inp["ht"], inp["wt"]) if teacher else (None, None)
    lq = None if inp["log_q"] is None else inp["log_q"].float()
    return (h, w, ht, wt, inp["y"], inp["neg"], lq, 2.0, 0.5 if teacher else 0.0, True, IGNORE,
            backend)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("teacher, log_q", [(True, True), (False, True), (False, False)])
def test_opcheck(backend, teacher, log_q):
    import spnn_fast.ops.sampled_softmax  # noqa: F401  (registers the op)

    torch.library.opcheck(torch.ops.spnn_fast.sampled_softmax_rows.default,
                          _op_args(backend, teacher, log_q))  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("fn_name", ["ce", "kd"])
def test_torch_compile_fullgraph(backend, fn_name):
    inp = make_inputs(17, 12)

    def fn(i, **kw):
        return call(fn_name, i, temperature=2.0, **kw) if fn_name == "kd" else call("ce", i, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run_loss(compiled, inp, backend=backend)
    want = run_loss(fn, inp, backend=backend)
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, name, rtol=1e-6, atol=1e-7)


# --- memory: the torch path never holds N x K -------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    import spnn_fast.functional as SF
    from spnn_fast.sampling import NegativeSampler

    torch.set_num_threads(1)  # the peak does not depend on it; the run time stays predictable

    def status_bytes(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    n, k, c, d = 65536, 4096, 100_000, 32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(c, d, generator=g) * 0.1).requires_grad_()
    ht, wt = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g) * 0.1
    y = torch.randint(1, c, (n,), generator=g)
    sampler = NegativeSampler(c, torch.randint(1, 1000, (c,), generator=g), power=0.75)
    neg, log_q = sampler.sample(k, generator=g), sampler.log_q
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_bytes("VmRSS")
    assert status_bytes("VmHWM") - base < 16 * 2**20, "VmHWM was not reset"
    loss = SF.sampled_distillation_loss(h, w, ht, wt, y, neg, log_q=log_q, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and w.grad is not None
    print(status_bytes("VmHWM") - base)
    """
)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak RSS"
)
def test_torch_path_memory_is_bounded():
    """N=65536 rows, K=4096 negatives, D=32, alpha=0.5, forward + backward: one [N, K] fp32
    buffer alone would be 1.07 GB (the formed-logits reference holds several)."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    print(f"peak extra RSS of the chunked path: {peak / 2**20:.0f} MiB")
    assert peak < 0.4e9, f"peak extra RSS {peak / 2**20:.0f} MiB >= 0.4 GB"


# --- GPU only: half precision in the kernels, memory, determinism -----------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_triton_low_precision_within_reference_error(dtype, alpha):
    """The kernels' error at a dtype stays within a small multiple of the formed-logits
    reference's own error at that dtype (both against float64)."""
    inp = make_inputs(1031, 2053, c=5000, d=64, dt=128, dtype=dtype)
    kw = dict(alpha=alpha, temperature=2.0, reduction="sum")
    got = run_loss(lambda i, **k: call("kd", i, **k), inp, backend="triton", **kw)
    naive = run_loss(lambda i, **k: reference_call("kd", i, **k), inp, **kw)
    want = run_loss(lambda i, **k: reference_call("kd", i, **k), to64(inp), **kw)
    for name, a, b, e in zip(("loss", "d_hidden", "d_items"), got, naive, want):
        err, base = (a - e).abs().max().item(), (b - e).abs().max().item()
        floor = 1e-6 * (1 + e.abs().max().item())
        assert err <= 3 * base + floor, f"{dtype} {name}: kernel err {err:.3e}, naive {base:.3e}"


@needs_cuda
@needs_triton
@pytest.mark.gpu
def test_triton_memory_bounded_and_deterministic_on_gpu():
    n, k, c = 65536, 8192, 200_000
    inp = make_inputs(n, k, c=c, d=64, dt=64, ignore_frac=0.1)
    inp["neg"][: k // 2] = inp["neg"][k // 2 :]  # many duplicates
    grads = []
    for _ in range(2):
        h = inp["h"].clone().requires_grad_()
        w = inp["w"].clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call("kd", dict(inp, h=h, w=w), backend="triton").backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # gradients, d_hidden rows and d_items' (N + K) x D fp32 rows; one N x K fp32 buffer
        # alone would be 2.1 GB
        assert extra < 6 * (n + k + c) * 64 * 4 + 2**20, f"peak extra {extra / 2**20:.0f} MiB"
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --- without a GPU: compile the kernels for sm_90 (catches what the interpreter does not) -------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import kernel_stats as ks
    from spnn_fast.kernels import sampled_softmax as K

    meta = torch.device("meta")
    cases = []
    for name, dtype, d, alphas in (("bf16", torch.bfloat16, 64, (0.0, 0.5)),
                                   ("bf16", torch.bfloat16, 256, (0.5,)),
                                   ("fp16", torch.float16, 256, (0.0,)),
                                   ("fp32", torch.float32, 64, (0.5,))):
        n, c, k = 4096, 100_000, 2048
        e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=meta)
        ops = (e(n, d), e(c, d), e(n, d), e(c, d), e(n, dt=torch.int64), e(k, dt=torch.int64),
               e(c, dt=torch.float32))
        stats = [e(n, dt=torch.float32) for _ in range(3)]
        g, d_rows, d_pos = e(n, dt=torch.float32), e(n, d, dt=torch.float32), e(n, dt=torch.float32)
        for alpha in alphas:
            shape = dict(N=n, C=c, K=k, D=d, alpha=alpha)
            fwd = lambda ops=ops, a=alpha: K.sampled_softmax_fwd(*ops, 2.0, a, True, -100)
            bwd = lambda ops=ops, a=alpha: K.sampled_softmax_bwd(
                g, *ops, *stats, 2.0, a, True, -100, d_hidden_rows=d_rows, d_positive=d_pos)
            cases.append(ks.Case("sampled_softmax_fwd", "full", name, dict(shape), fwd))
            cases.append(ks.Case("sampled_softmax_bwd", "full", name, dict(shape), bwd))
    print(json.dumps(ks.run_cases(cases)))
    """
)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_kernels_compile_for_sm90_as_launched():
    """Real (not interpreted) compilation to sm_90 cubins of the three kernels as the launchers
    launch them (bf16 and fp16 up to D = 256, fp32, with and without a teacher): code
    generation, ptxas, no half-precision spills, shared memory within an H100/H200 block's."""
    reason = load_kernel_stats().compile_unavailable_reason(here=False)
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(KERNEL_STATS.parent)],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    check_compiled(records, ("sampled_softmax_fwd", "sampled_softmax_bwd", "scatter_rows"),
                   {"bf16", "fp16", "fp32"})  # fmt: skip


# --- the modules ----------------------------------------------------------------------------------


def test_modules_wrap_the_functions():
    import spnn_fast.nn as snn

    inp = make_inputs(9, 7)
    ce = snn.SampledSoftmaxLoss(remove_accidental_hits=False, reduction="sum", backend="torch")
    assert "remove_accidental_hits=False" in repr(ce) and "reduction='sum'" in repr(ce)
    args = (inp["h"], inp["w"], inp["y"], inp["neg"], inp["log_q"])
    want = call("ce", inp, remove_accidental_hits=False, reduction="sum", backend="torch")
    assert torch.equal(ce(*args), want)
    kd = snn.SampledDistillationLoss(temperature=3.0, alpha=0.25, reduction="none",
                                     backend="torch")  # fmt: skip
    assert "temperature=3.0" in repr(kd) and "alpha=0.25" in repr(kd)
    args = (inp["h"], inp["w"], inp["ht"], inp["wt"], inp["y"], inp["neg"], inp["log_q"])
    want = call("kd", inp, temperature=3.0, alpha=0.25, reduction="none", backend="torch")
    assert torch.equal(kd(*args), want)
    no_teacher = snn.SampledDistillationLoss(backend="torch")  # alpha 0 without a teacher
    assert torch.equal(no_teacher(inp["h"], inp["w"], target=inp["y"], negatives=inp["neg"]),
                       call("kd", dict(inp, log_q=None), alpha=0.0, backend="torch"))  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.7, 1.0])
def test_torch_path_scores_counted_rows_only(monkeypatch, alpha, ignore_frac):
    """Every position of a batch may go in with ignore_index at the others (static shapes):
    the chunked path forms the candidates' logits of the counted rows alone, same results."""
    import spnn_fast.functional as SF

    inp = make_inputs(37, 9, seed=3, ignore_frac=ignore_frac)
    seen = []
    chunks = ref._Chunks

    class Spy(chunks):
        def __init__(self, h, *rest):
            seen.append(h.shape[0])
            super().__init__(h, *rest)

    monkeypatch.setattr(ref, "_Chunks", Spy)

    def loss(i):
        h = i["h"].detach().clone().requires_grad_()
        w = i["w"].detach().clone().requires_grad_()
        out = SF.sampled_distillation_loss(h, w, i["ht"], i["wt"], i["y"], i["neg"],
                                           log_q=i["log_q"], alpha=alpha, reduction="sum",
                                           backend="torch")  # fmt: skip
        out.backward()
        return out, h.grad, w.grad

    got = loss(inp)
    counted = int((inp["y"] != IGNORE).sum())
    assert seen == [counted, counted], seen
    monkeypatch.setattr(ref, "_Chunks", chunks)
    want = loss(to64(inp))
    for name, a, e in zip(("loss", "d_hidden", "d_items"), got, want):
        assert_close(a, e, name)
