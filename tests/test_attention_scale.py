"""Semantic attention at every finite scale, zero and negative ones included, on every backend
and (on the CPU torch path, which runs PyTorch's fused kernel) in every dtype: a scale <= 0 with
the causal flag once turned every row but the last NaN."""

from __future__ import annotations

import pytest
import torch
from _utils import assert_close
from test_attention import BACKEND_DEVICES, make_inputs

from spnn_fast.functional import semantic_attention
from spnn_fast.reference.attention import semantic_attention_math

LEAVES = ("q", "k", "v", "time_bias")


def _run(inputs, causal, scale, backend, grad_out, dtype=None):
    ins = {n: (t.to(dtype) if dtype is not None and t is not None and t.is_floating_point() else t)
           for n, t in inputs.items()}  # fmt: skip
    leaves = []
    for n in LEAVES:
        if ins[n] is not None:
            ins[n] = ins[n].detach().requires_grad_(True)
            leaves.append(ins[n])
    if backend == "math":
        out = semantic_attention_math(ins["q"], ins["k"], ins["v"], ins["key_mask"], causal,
                                      ins["timestamps"], ins["time_bias"], scale)  # fmt: skip
    else:
        out = semantic_attention(**ins, causal=causal, scale=scale, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("scale", [0.0, -0.0, -0.25, -3.0, 1e-30, 4.0])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_finite_scale_matches_the_reference(backend, device, scale, bias, causal):
    inputs = make_inputs(2, 2, 9, 16, "left", bias, device=device, seed=5)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(2))
    g = g.to(device)
    want, want_grads = _run(inputs, causal, scale, "math", g.double(), torch.float64)
    out, grads = _run(inputs, causal, scale, backend, g)
    assert_close(out, want, "out", atol=1e-5, rtol=1e-4)
    for name, a, e in zip(("dq", "dk", "dv", "dtime_bias"), grads, want_grads):
        assert_close(a, e, name, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_scale_at_or_below_zero_in_half_precision_on_the_cpu(dtype, scale):
    inputs = make_inputs(2, 2, 9, 16, "right", False, seed=6)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(3))
    want, want_grads = _run(inputs, True, scale, "math", g.double(), torch.float64)
    out, grads = _run(inputs, True, scale, "torch", g, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert out.dtype == dtype
    assert_close(out, want, "out", atol=tol, rtol=tol)
    for name, a, e in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(a, e, name, atol=tol, rtol=tol)
