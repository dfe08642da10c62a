"""spnn_fast.functional.linear_cross_entropy and nn.LinearCrossEntropyLoss: PyTorch's drop-in,
held to ``cross_entropy(linear(...))`` in float64 everywhere and to
``torch.nn.functional.linear_cross_entropy`` where the installed torch has it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import DEVICE, assert_close, needs_triton

import spnn_fast.functional as SF
import spnn_fast.nn as snn

TORCH_HAS_IT = hasattr(F, "linear_cross_entropy")


def make(lead=(5, 7), d=16, c=33, *, seed=0, ignore=(0, 3), ignore_value=-100,
         dtype=torch.float32):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, lead, generator=g)
    y.view(-1)[list(ignore)] = ignore_value
    cls = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(x), cast(w), cast(b), y.to(DEVICE), cast(cls)


def reference(x, w, y, *, linear_bias=None, weight=None, reduction="mean", ignore_index=-100,
              label_smoothing=0.0):  # fmt: skip
    """The definition: the logits formed, then cross_entropy (leading dims flattened)."""
    logits = F.linear(x, w, linear_bias).reshape(-1, w.shape[0])
    out = F.cross_entropy(logits, y.reshape(-1).long(), weight=weight, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing)  # fmt: skip
    return out.reshape(y.shape) if reduction == "none" else out


def run(fn, x, w, b, y, **kw):
    """(loss, d_input, d_weight, d_bias or None) in float64, backward with a random gradient."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if kw.pop("bias", False) else None
    out = fn(x, w, y, linear_bias=b, **kw)
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * go.to(out.dtype).to(out.device)).sum().backward()
    grads = [x.grad, w.grad, None if b is None else b.grad]
    return [None if t is None else t.detach().double().cpu() for t in (out, *grads)]


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(bias=True),
    dict(weight=True),
    dict(label_smoothing=0.1),
    dict(weight=True, label_smoothing=0.25, bias=True, reduction="mean"),
    dict(weight=True, label_smoothing=1.0, reduction="none"),
    dict(ignore_index=5),
]


def _kw(case, cls):
    kw = dict(case)
    if kw.pop("weight", False):
        kw["weight"] = cls
    return kw


def _double(kw):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("lead", [(37,), (5, 7), ()], ids=["2d", "3d", "1d"])
def test_matches_cross_entropy_of_linear(case, lead):
    kw = dict(case)
    x, w, b, y, cls = make(lead, ignore=() if lead == () else (0, 3),
                           ignore_value=kw.get("ignore_index", -100))  # fmt: skip
    kw = _kw(case, cls)
    want = run(reference, *(t.double() for t in (x, w, b)), y, **_double(kw))
    got = run(SF.linear_cross_entropy, x, w, b, y, backend="torch", **kw)
    for name, a, e in zip(("loss", "d_input", "d_weight", "d_bias"), got, want):
        if e is not None:
            assert_close(a, e, name, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TORCH_HAS_IT, reason="this torch has no linear_cross_entropy")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torchs_linear_cross_entropy(case):
    x, w, b, y, cls = make((41,), ignore_value=case.get("ignore_index", -100))
    kw = _kw(case, cls)
    want = run(F.linear_cross_entropy, x, w, b, y, **kw)
    got = run(SF.linear_cross_entropy, x, w, b, y, backend="torch", **kw)
    for name, a, e in zip(("loss", "d_input", "d_weight", "d_bias"), got, want):
        if e is not None:
            assert_close(a, e, name, rtol=1e-4, atol=1e-5)


def test_integer_targets_of_any_dtype_and_all_ignored():
    x, w, b, y, _ = make((6, 4))
    want = SF.linear_cross_entropy(x, w, y, backend="torch")
    for dtype in (torch.int32, torch.int16):
        got = SF.linear_cross_entropy(x, w, y.to(dtype), backend="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ignored = torch.full_like(y, -100)  # nothing counts: the mean is 0/0, NaN, as in PyTorch
    assert torch.isnan(SF.linear_cross_entropy(x, w, ignored, backend="torch"))
    assert torch.isnan(reference(x, w, ignored))
    assert SF.linear_cross_entropy(x, w, ignored, reduction="sum", backend="torch") == 0


def test_autocast_runs_the_matmul_in_bfloat16_and_returns_float32():
    x, w, _, y, _ = make((24,))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = SF.linear_cross_entropy(x, w, y, backend="torch")
        want = reference(x, w, y)
    assert got.dtype == want.dtype == torch.float32
    # Both round the operands to bfloat16; the sums may differ in order only.
    assert_close(got, want, "loss", rtol=2e-3, atol=2e-3)
    assert SF.linear_cross_entropy(x.double(), w.double(), y).dtype == torch.float64
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # autocast leaves float64 alone
        got64 = SF.linear_cross_entropy(x.double(), w.double(), y, backend="torch")
        assert got64.dtype == torch.float64
        torch.testing.assert_close(got64, reference(x.double(), w.double(), y), rtol=1e-9,
                                   atol=1e-9)  # fmt: skip
    assert SF.linear_cross_entropy(x.bfloat16(), w.bfloat16(), y).dtype == torch.bfloat16


@needs_triton
@pytest.mark.parametrize("case", [dict(), dict(bias=True, weight=True, label_smoothing=0.2)],
                         ids=["plain", "bias-weight-smoothing"])  # fmt: skip
def test_triton_matches_reference(case):
    x, w, b, y, cls = make((3, 11), c=19)
    kw = _kw(case, cls)
    want = run(reference, *(t.double() for t in (x, w, b)), y, **_double(kw))
    got = run(SF.linear_cross_entropy, x, w, b, y, backend="triton", **kw)
    for name, a, e in zip(("loss", "d_input", "d_weight", "d_bias"), got, want):
        if e is not None:
            assert_close(a, e, name, rtol=1e-4, atol=1e-5)


def test_module_matches_torchs_and_loads_its_state():
    torch.manual_seed(0)
    ours = snn.LinearCrossEntropyLoss(16, 33, bias=True, label_smoothing=0.1,
                                      weight=torch.rand(33) + 0.5, backend="torch")  # fmt: skip
    x, _, _, y, _ = make((9,))
    if TORCH_HAS_IT:
        theirs = torch.nn.LinearCrossEntropyLoss(16, 33, bias=True, label_smoothing=0.1,
                                                 weight=ours.weight)  # fmt: skip
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)
    want = reference(x, ours.linear.weight, y, linear_bias=ours.linear.bias, weight=ours.weight,
                     label_smoothing=0.1)  # fmt: skip
    torch.testing.assert_close(ours(x, y), want, rtol=1e-5, atol=1e-6)
    assert "num_classes=33" in repr(ours)
    with pytest.raises(NotImplementedError, match="out_features"):
        snn.LinearCrossEntropyLoss(16, 33, out_features=(2,))
    with pytest.raises(ValueError, match=r"weight must have shape \(33,\)"):
        snn.LinearCrossEntropyLoss(16, 33, weight=torch.ones(5))


def test_compiles_without_a_graph_break():
    x, w, b, y, _ = make((10,))
    fn = torch.compile(
        lambda x, w, b, y: SF.linear_cross_entropy(x, w, y, linear_bias=b, backend="torch"),
        fullgraph=True, backend="aot_eager",
    )  # fmt: skip
    torch.testing.assert_close(fn(x, w, b, y), reference(x, w, y, linear_bias=b),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(target="probabilities"), NotImplementedError, "class-probability targets"),
        (dict(reduction="avg"), ValueError, "reduction must be one of mean, sum, none"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
        (dict(weight=torch.ones(3)), ValueError, r"weight must be a \[C=33\] tensor"),
        (dict(linear_bias=torch.ones(32)), ValueError, r"linear_bias must be a \[C=33\] tensor"),
        (dict(linear_weight=torch.ones(33, 15)), ValueError, r"linear_weight must be \[C, D=16\]"),
        (dict(target=torch.full((9,), 33)), ValueError, r"outside \[0, V=33\)"),
        (dict(target=torch.zeros(8, dtype=torch.long)), ValueError, r"leading shape \(9,\)"),
        (dict(ignore_index=1.5), ValueError, "ignore_index must be an int"),
        (dict(ignore_index=2**63), ValueError, "ignore_index must be an int64"),
    ],
)
def test_bad_input(change, error, match):
    x, w, _, y, _ = make((9,))
    kw = dict(input=x, linear_weight=w, target=y, backend="torch")
    kw.update(change)
    if kw["target"] == "probabilities":
        kw["target"] = torch.rand(9, 33)
    with pytest.raises(error, match=match):
        SF.linear_cross_entropy(**kw)
