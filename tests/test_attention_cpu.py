"""The attention's CPU path in each of its forms, held to the float64 definition: the fused
kernel (its own output layout), the kept-probabilities path of a time-bias gradient over short
windows, and the chunked recurrence that takes over above PROBS_BUDGET."""

from __future__ import annotations

import pytest
import torch
from test_attention import CASES, _case_id, _leaves, check_against_reference, make_inputs, run_op

from spnn_fast.functional import semantic_attention
from spnn_fast.ops.attention import semantic_attention_probs_bwd, semantic_attention_probs_fwd
from spnn_fast.reference import attention_cpu


@pytest.fixture(params=["probs", "recurrence"])
def bias_grad_path(request, monkeypatch):
    """The bias gradient by kept probabilities, or (no budget for them) by the recurrence."""
    if request.param == "recurrence":
        monkeypatch.setattr(attention_cpu, "PROBS_BUDGET", 0)
    return request.param


@pytest.mark.parametrize("case", [c for c in CASES if c[5]], ids=_case_id)
def test_bias_gradient_paths_match_the_reference(case, bias_grad_path):
    B, H, L, D, mask, bias, causal = case
    inputs = make_inputs(B, H, L, D, mask, bias)
    check_against_reference(inputs, causal, "torch", atol=2e-5, rtol=2e-4)


def test_the_path_is_chosen_by_the_probabilities_size(monkeypatch):
    calls = []
    real = attention_cpu.probs_fwd
    monkeypatch.setattr(attention_cpu, "probs_fwd", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(2, 2, 9, 16, "left", True)
    run_op(inputs, True, "torch")
    assert calls == [1]
    monkeypatch.setattr(attention_cpu, "PROBS_BUDGET", 2 * 2 * 9 * 9 * 4 - 1)
    run_op(inputs, True, "torch")
    assert calls == [1]  # over the budget: the fused kernel and the recurrence
    with torch.no_grad():  # a forward whose probabilities do not fit: the kernel
        semantic_attention(**inputs, causal=True, backend="torch")
    assert calls == [1]
    monkeypatch.setattr(attention_cpu, "PROBS_BUDGET", 2 * 2 * 9 * 9 * 4)
    with torch.no_grad():  # a forward whose probabilities fit: computed, not kept
        semantic_attention(**inputs, causal=True, backend="torch")
    assert calls == [1, 1]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("path", ["probs", "kernel"])
def test_forward_alone_matches_the_reference(case, path, monkeypatch):
    """Without a gradient, on the probabilities path (small score matrices) or the kernel."""
    from spnn_fast.reference.attention import semantic_attention_math

    if path == "kernel":
        monkeypatch.setattr(attention_cpu, "PROBS_BUDGET", 0)
    B, H, L, D, mask, bias, causal = case
    inputs = make_inputs(B, H, L, D, mask, bias)
    with torch.no_grad():
        got = semantic_attention(**inputs, causal=causal, backend="torch")
    d = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in
         inputs.items()}  # fmt: skip
    want = semantic_attention_math(d["q"], d["k"], d["v"], d["key_mask"], causal,
                                   d["timestamps"], d["time_bias"])  # fmt: skip
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("bias_grad", [True, False])
def test_opcheck_of_the_probabilities_ops(bias_grad):
    inputs = make_inputs(2, 2, 7, 16, "left", True)
    ins, _ = _leaves(inputs)
    args = (ins["q"], ins["k"], ins["v"], ins["key_mask"], ins["timestamps"], ins["time_bias"],
            True, 0.25)  # fmt: skip
    torch.library.opcheck(semantic_attention_probs_fwd, args)
    out, probs = semantic_attention_probs_fwd(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bwd = (torch.randn_like(out), *plain[:3], out.detach(), probs, *plain[3:], bias_grad)
    torch.library.opcheck(semantic_attention_probs_bwd, bwd)


def test_gradcheck_of_the_probabilities_path():
    inputs = make_inputs(2, 2, 5, 4, "left", True, dtype=torch.float64)
    ins, leaves = _leaves(inputs)

    def f(q, k, v, tb):
        return semantic_attention(q, k, v, key_mask=ins["key_mask"], timestamps=ins["timestamps"],
                                  time_bias=tb, backend="torch")  # fmt: skip

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_nan_in_masked_keys_stays_out_of_every_path(bias_grad_path):
    inputs = make_inputs(3, 2, 20, 16, "left", True, seed=4)
    want, want_grads = run_op(inputs, True, "torch")
    poisoned = dict(inputs)
    for name in ("k", "v"):
        t = inputs[name].detach().clone()
        t[~inputs["key_mask"][:, None, :, None].expand_as(t)] = float("nan")
        poisoned[name] = t
    out, grads = run_op(poisoned, True, "torch")
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, want)
    for g, e in zip(grads, want_grads):
        torch.testing.assert_close(g, e)


def test_cpu_outputs_in_the_kernels_layout(monkeypatch):
    """The fused kernel's outputs come back as they are: for q, k, v cut from one projection as a
    module cuts them, [B, L, H, D] strides, so the module's out.transpose(1, 2).reshape(B, L, d)
    is a view; for contiguous ones, whatever the kernel gives, with the same values. Under
    torch.compile the op's output has the strides its fake promises. (Windows this short take
    the probabilities path, whose output is contiguous, unless told otherwise.)"""
    monkeypatch.setattr(attention_cpu, "PROBS_NO_BIAS_MAX_L", 0)
    inputs = make_inputs(2, 3, 9, 16, "right", False)
    B, H, L, D = inputs["q"].shape
    x = torch.stack([inputs[n].transpose(1, 2) for n in "qkv"], 2).contiguous()  # [B, L, 3, H, D]
    q, k, v = x.permute(2, 0, 3, 1, 4)
    out = semantic_attention(q, k, v, key_mask=inputs["key_mask"], causal=True, backend="torch")
    assert out.stride() == (L * H * D, D, H * D, 1)
    assert out.transpose(1, 2).reshape(B, L, H * D).data_ptr() == out.data_ptr()
    plain = semantic_attention(**inputs, causal=True, backend="torch")
    assert torch.equal(plain, out)
    compiled = torch.compile(lambda **kw: semantic_attention(**kw, causal=True, backend="torch"),
                             fullgraph=True)  # fmt: skip
    got = compiled(**inputs)
    assert torch.equal(got, out) and got.stride() == (L * H * D, D, H * D, 1)


@pytest.mark.parametrize("case", CASES[:8], ids=_case_id)
def test_eager_calls_are_the_registered_op(case, monkeypatch):
    """Eager CPU calls skip the custom op's dispatch (the same functions under an
    autograd.Function): outputs and every gradient bitwise those of the op, which a tracer gets."""
    from spnn_fast.ops import attention as ops

    B, H, L, D, mask, bias, causal = case
    inputs = make_inputs(B, H, L, D, mask, bias)
    g = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1))
    eager = run_op(inputs, causal, "torch", grad_out=g)
    monkeypatch.setattr(ops, "traced", lambda tensors: True)
    traced = run_op(inputs, causal, "torch", grad_out=g)
    assert torch.equal(eager[0], traced[0])
    for a, b in zip(eager[1], traced[1]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_tracers_get_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spnn_fast.ops import attention as ops

    q = torch.randn(2, 2, 5, 16)
    assert not ops.traced((q, q, q, None))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        assert ops.traced((fake, fake, fake, None))
        out = semantic_attention(fake, fake, fake, causal=True, backend="torch")
        assert out.shape == q.shape


@pytest.mark.parametrize("L", [20, 80])  # the kept probabilities without a bias; the kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["forward", "q_grad", "all_grads"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_poisoned_masked_keys_stay_out_of_every_cpu_path(L, bias, mode, poison):
    """NaN or an infinity in the keys and values of masked positions, through each CPU path
    (the kernel's forward alone, its backward with or without the bias's gradient, the kept
    probabilities): the output and every gradient equal those of clean inputs."""
    inputs = make_inputs(3, 2, L, 16, "left", bias, seed=4)
    poisoned = dict(inputs)
    for name in ("k", "v"):
        t = inputs[name].clone()
        t[~inputs["key_mask"][:, None, :, None].expand_as(t)] = poison
        poisoned[name] = t

    def run(ins):
        ins = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in ins.items()}
        leaves = []
        if mode != "forward":
            for n in ("q",) if mode == "q_grad" else ("q", "k", "v", "time_bias"):
                if ins[n] is not None:
                    leaves.append(ins[n].requires_grad_(True))
        with torch.set_grad_enabled(mode != "forward"):
            out = semantic_attention(**ins, causal=True, backend="torch")
        if leaves:
            out.pow(2).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    want, want_grads = run(inputs)
    got, grads = run(poisoned)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
