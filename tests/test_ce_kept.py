"""The plain cross-entropy's kept-exponentials path (eager CPU calls within the budget) against
the chunked op it stands in for, and the float64 definition."""

from __future__ import annotations

import pytest
import torch
from test_distill import IGNORE, make_inputs, run_loss

import spnn_fast.functional as SF
from spnn_fast.reference import ce_kept
from spnn_fast.reference import distill as ref


def _ce(hs, ws, ht, wt, y, **kw):
    return SF.distillation_loss(hs, ws, target=y, ignore_index=IGNORE, backend="torch", **kw)


@pytest.fixture
def calls(monkeypatch):
    """How many times the kept path ran."""
    seen = []
    real = ce_kept.ce_rows_kept
    monkeypatch.setattr(ce_kept, "ce_rows_kept", lambda *a: seen.append(1) or real(*a))
    return seen


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_path_is_the_chunked_op(ignore_frac, reduction, dtype, calls, monkeypatch):
    inp = make_inputs(37, 53, seed=3, ignore_frac=ignore_frac)
    inp = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in inp.items()}
    got = run_loss(_ce, inp, reduction=reduction)
    assert calls == [1]
    monkeypatch.setattr(ce_kept, "KEEP_BUDGET_BYTES", 0)
    want = run_loss(_ce, inp, reduction=reduction)
    assert calls == [1]  # over the budget: the op
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    exact = run_loss(ref.distillation_loss_reference, make_inputs(37, 53, seed=3,
                     ignore_frac=ignore_frac), alpha=0.0, reduction=reduction,
                     ignore_index=IGNORE)  # fmt: skip
    if dtype == torch.float32:
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", ["items", "hidden"])
def test_a_frozen_input_gets_no_gradient_and_costs_none(frozen, monkeypatch):
    inp = make_inputs(20, 31, seed=5)
    hs = inp["hs"].float().requires_grad_(frozen != "hidden")
    ws = inp["ws"].float().requires_grad_(frozen != "items")
    products = []
    real = ce_kept.ce_rows_kept_backward

    def spy(*a, **kw):
        products.append((kw["need_hidden"], kw["need_items"]))
        return real(*a, **kw)

    monkeypatch.setattr(ce_kept, "ce_rows_kept_backward", spy)
    SF.distillation_loss(hs, ws, target=inp["y"], ignore_index=IGNORE, backend="torch").backward()
    assert products == [(frozen != "hidden", frozen != "items")]
    monkeypatch.setattr(ce_kept, "KEEP_BUDGET_BYTES", 0)  # the chunked op
    hs2, ws2 = (t.detach().clone().requires_grad_(t.requires_grad) for t in (hs, ws))
    SF.distillation_loss(hs2, ws2, target=inp["y"], ignore_index=IGNORE, backend="torch").backward()
    for a, b in ((hs.grad, hs2.grad), (ws.grad, ws2.grad)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_backward_twice_with_a_retained_graph():
    """The kept exponentials are read, not consumed: a second backward gives the same."""
    inp = make_inputs(16, 25, seed=2)
    hs = inp["hs"].float().requires_grad_()
    loss = SF.distillation_loss(hs, inp["ws"].float(), target=inp["y"], ignore_index=IGNORE,
                                backend="torch")  # fmt: skip
    (g1,) = torch.autograd.grad(loss, hs, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hs)
    assert torch.equal(g1, g2)


def test_only_eager_plain_cross_entropy_keeps(calls):
    inp = make_inputs(12, 17, seed=1)
    hs, ws, y = inp["hs"].float(), inp["ws"].float(), inp["y"]
    SF.distillation_loss(hs, ws, target=y, ignore_index=IGNORE, backend="torch")
    assert calls == [1]
    # with a teacher: the op
    SF.distillation_loss(hs, ws, inp["ht"].float(), inp["wt"].float(), target=y,
                         ignore_index=IGNORE, alpha=0.5, backend="torch")  # fmt: skip
    assert calls == [1]
    # traced (here by a compile of the graph alone): the registered op
    fn = torch.compile(lambda h: SF.distillation_loss(h, ws, target=y, ignore_index=IGNORE,
                                                      backend="torch"),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(
        fn(hs), SF.distillation_loss(hs, ws, target=y, ignore_index=IGNORE, backend="torch")
    )
    assert calls == [1, 1]  # the eager comparison only
