"""Semantic attention: Triton kernels and the PyTorch path against the eager float64 reference.

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest) on
CPU tensors, in fp32 and at small sizes; with CUDA the same cases also run on the GPU, plus
fp16/bf16 cases whose error is bounded by the reference's own error at that dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _utils import assert_close, check_compiled, kernel_stats

from spnn_fast import backends
from spnn_fast.functional import semantic_attention
from spnn_fast.nn import SemanticAttention
from spnn_fast.ops.attention import semantic_attention_bwd, semantic_attention_fwd
from spnn_fast.reference.attention import (
    bias_scores,
    semantic_attention_math,
)
from spnn_fast.reference.attention_baselines import semantic_attention_sdpa
from spnn_fast.reference.time_bucket import time_bucket, time_bucket_np

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
NB = 32


def _backends(device: str):
    """(backend, device) pairs that can run here: triton on CPU only under the interpreter."""
    out = [pytest.param("torch", device, id=f"torch-{device}")]
    triton_ok = backends.status()["triton_installed"] and (
        device == "cuda" or backends.interpret_mode()
    )
    if triton_ok:
        out.append(pytest.param("triton", device, id=f"triton-{device}"))
    return out


BACKEND_DEVICES = [p for d in DEVICES for p in _backends(d)]


def make_timestamps(B, L, generator, huge=False):
    """Sorted int64 seconds whose gaps range from 0 to 1e9 (with ``huge``, some up to 2**62)."""
    scales = torch.tensor([0, 1, 60, 3600, 86400, 10**7, 10**9], dtype=torch.int64)
    pick = torch.randint(0, len(scales), (B, L), generator=generator)
    frac = torch.rand((B, L), generator=generator, dtype=torch.float64)
    gaps = (scales[pick].double() * frac).to(torch.int64)
    ts = torch.cumsum(gaps, dim=1) + 1_700_000_000
    if huge:  # not sorted any more: the op does not need sorted timestamps
        ts[:, ::3] = torch.randint(0, 2**62, (B, (L + 2) // 3), generator=generator)
    return ts


def make_mask(kind, B, L, generator):
    if kind == "none":
        return None
    lengths = torch.randint(1, L + 1, (B,), generator=generator)
    lengths[0] = max(1, L // 2)
    ar = torch.arange(L)
    if kind == "right":
        return ar[None, :] < lengths[:, None]
    if kind == "left":
        return ar[None, :] >= (L - lengths)[:, None]
    assert kind == "empty"  # sequence 0 is all padding, sequence 1 (if any) left-padded
    mask = ar[None, :] >= (L - lengths)[:, None]
    mask[0] = False
    return mask


def make_inputs(
    B, H, L, D, mask_kind, bias, *, dtype=torch.float32, device="cpu", seed=0, huge=False, nb=NB
):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    tb = torch.randn(H, nb, generator=g, dtype=torch.float64) if bias else None
    ts = make_timestamps(B, L, g, huge=huge) if bias else None
    mask = make_mask(mask_kind, B, L, g)
    to = lambda t: None if t is None else t.to(device=device)
    tof = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return dict(
        q=tof(q),
        k=tof(k),
        v=tof(v),
        key_mask=to(mask),
        timestamps=to(ts),
        time_bias=tof(tb),
    )


LEAVES = ("q", "k", "v", "time_bias")


def _leaves(inputs):
    """A copy of ``inputs`` whose floating tensors are fresh leaves, and the list of them."""
    out = dict(inputs)
    for n in LEAVES:
        if out[n] is not None:
            out[n] = out[n].detach().requires_grad_(True)
    return out, [out[n] for n in LEAVES if out[n] is not None]


def run_op(inputs, causal, backend, grad_out=None, dtype=None):
    """Forward + backward through the op (``backend``) or the eager reference (``"math"``),
    optionally after casting the inputs to ``dtype``: (out, [grads of q, k, v, time_bias])."""
    leaves_in = inputs
    if dtype is not None:
        leaves_in = {
            n: (t.to(dtype) if t is not None and t.is_floating_point() else t)
            for n, t in inputs.items()
        }
    ins, leaves = _leaves(leaves_in)
    if backend == "math":
        out = semantic_attention_math(
            ins["q"],
            ins["k"],
            ins["v"],
            ins["key_mask"],
            causal,
            ins["timestamps"],
            ins["time_bias"],
        )
    else:
        out = semantic_attention(**ins, causal=causal, backend=backend)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return out, list(grads)


GRAD_NAMES = ("dq", "dk", "dv", "dtime_bias")

# (B, H, L, D, mask, bias, causal): every value of every axis of the test grid appears at least once
# (and D = 128, whose backward iterates over tiles of 16).
CASES = [
    (2, 3, 1, 16, "right", True, True),
    (2, 1, 7, 32, "left", True, True),
    (2, 3, 7, 64, "none", True, False),
    (2, 3, 7, 16, "empty", True, False),
    (2, 3, 50, 16, "right", True, True),
    (2, 3, 50, 32, "empty", True, True),
    (2, 1, 50, 64, "left", False, False),
    (2, 1, 50, 32, "right", True, False),
    (2, 3, 129, 16, "left", True, True),
    (1, 1, 129, 16, "none", False, True),
    (2, 3, 129, 16, "empty", True, False),
    (1, 2, 40, 128, "right", True, True),
]


def _case_id(c):
    B, H, L, D, mask, bias, causal = c
    return (
        f"B{B}H{H}L{L}D{D}-{mask}-{'bias' if bias else 'nobias'}-{'causal' if causal else 'full'}"
    )


def check_against_reference(inputs, causal, backend, atol, rtol):
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs["q"].shape, generator=g, dtype=torch.float64)
    grad_out = grad_out.to(inputs["q"].device)
    ref, ref_grads = run_op(inputs, causal, "math", grad_out, dtype=torch.float64)
    out, grads = run_op(inputs, causal, backend, grad_out)
    scale = lambda t: max(1.0, t.abs().max().item())
    assert_close(out, ref, atol=atol, rtol=rtol, name="out", scale_atol=False)
    for name, a, e in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(a, e, atol=atol * scale(e), rtol=rtol, name=name, scale_atol=False)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_fp32(case, backend, device):
    B, H, L, D, mask, bias, causal = case
    inputs = make_inputs(B, H, L, D, mask, bias, device=device, seed=L * 31 + D)
    check_against_reference(inputs, causal, backend, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("D", [8, 24])
def test_torch_path_any_head_dim(D):
    inputs = make_inputs(2, 3, 50, D, "left", True, seed=D)
    check_against_reference(inputs, True, "torch", atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_huge_gaps_and_64_buckets(backend, device):
    """Gaps up to 2**62 s with NB = 64: buckets up to 62 are exercised in the kernel."""
    inputs = make_inputs(2, 2, 40, 16, "right", True, device=device, seed=5, huge=True, nb=64)
    inputs["time_bias"] = inputs["time_bias"] * 3
    check_against_reference(inputs, True, backend, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_empty_rows_give_zero_output_and_zero_grads(backend, device):
    inputs = make_inputs(3, 2, 20, 16, "empty", True, device=device, seed=3)
    inputs["key_mask"][2, :5] = False  # leading rows of sequence 2 see no key (causal)
    out, grads = run_op(inputs, True, backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2, :, :5], torch.zeros_like(out[2, :, :5]))
    dq, dk, dv, _ = grads
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), name
        assert torch.equal(g[0], torch.zeros_like(g[0])), f"{name} of an all-padding sequence"
    assert torch.equal(dq[2, :, :5], torch.zeros_like(dq[2, :, :5]))
    assert dq[2, :, 5:].abs().sum() > 0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_nan_in_masked_keys_and_values_stays_out(backend, device):
    """A key that takes no part (key_mask False) cannot reach the output, whatever it holds:
    NaN in its key or value rows leaves every row finite, rows without a key included."""
    inputs = make_inputs(3, 2, 20, 16, "left", True, device=device, seed=4)
    want, want_grads = run_op(inputs, True, backend)
    poisoned = dict(inputs)
    for name in ("k", "v"):
        t = inputs[name].detach().clone()
        t[~inputs["key_mask"][:, None, :, None].expand_as(t)] = float("nan")
        poisoned[name] = t
    out, grads = run_op(poisoned, True, backend)
    assert torch.isfinite(out).all()
    assert_close(out, want, "out", atol=1e-5, rtol=1e-5)
    for name, g, e in zip(GRAD_NAMES, grads, want_grads):
        if e is not None:
            assert torch.isfinite(g).all(), name
            assert_close(g, e, name, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_backward_with_expanded_grad(backend, device):
    """out.sum().backward(): the incoming gradient has stride 0."""
    inputs = make_inputs(2, 2, 33, 16, "right", True, device=device, seed=7)
    ref, ref_grads = run_op(inputs, True, "math", dtype=torch.float64)
    ins, leaves = _leaves(inputs)
    semantic_attention(**ins, causal=True, backend=backend).sum().backward()
    for name, leaf, e in zip(GRAD_NAMES, leaves, ref_grads):
        assert_close(
            leaf.grad,
            e,
            atol=2e-5 * max(1, e.abs().max().item()),
            rtol=1e-4,
            name=name,
            scale_atol=False,
        )


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_gradients_are_deterministic(backend, device):
    inputs = make_inputs(2, 3, 129, 16, "left", True, device=device, seed=11)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(2)).to(device)
    first = run_op(inputs, True, backend, g)[1]
    again = run_op(inputs, True, backend, g)[1]
    for name, a, b in zip(GRAD_NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.skipif(
    not CUDA, reason="fp16/bf16 kernels run on CUDA only (the interpreter computes bf16 wrongly)"
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6], CASES[8], CASES[10]], ids=_case_id)
def test_low_precision_error_bounded_by_reference_error(case, dtype, backend):
    """|op(dtype) - ref(fp64)| <= 2 * |ref(dtype) - ref(fp64)| + small atol (flash-attn style)."""
    B, H, L, D, mask, bias, causal = case
    inputs = make_inputs(B, H, L, D, mask, bias, device="cuda", seed=L + D)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(4)).cuda()
    exact, exact_grads = run_op(inputs, causal, "math", g, dtype=torch.float64)
    low, low_grads = run_op(inputs, causal, "math", g, dtype=dtype)
    out, grads = run_op(inputs, causal, backend, g, dtype=dtype)
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    for name, a, lo, e in zip(
        ("out",) + GRAD_NAMES, [out] + grads, [low] + low_grads, [exact] + exact_grads
    ):
        err = (a.double() - e).abs().max().item()
        ref_err = (lo.double() - e).abs().max().item()
        assert err <= 2 * ref_err + atol * max(1.0, e.abs().max().item()), (
            f"{name}: error {err:.3e} vs reference's own {ref_err:.3e} at {dtype}"
        )


# ------------------------------------------------------------------------------------------
# The oracle itself, the buckets, the baselines
# ------------------------------------------------------------------------------------------


def _brute_force(q, k, v, mask, causal, ts, tb, scale):
    """Loops over Python numbers: the documented definition, word for word."""
    B, H, L, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                js = [
                    j
                    for j in range(L)
                    if (not causal or j <= i) and (mask is None or bool(mask[b, j]))
                ]
                if not js:
                    continue
                s = []
                for j in js:
                    val = scale * float(q[b, h, i] @ k[b, h, j])
                    if tb is not None:
                        gap = abs(int(ts[b, i]) - int(ts[b, j]))
                        val += float(tb[h, min(tb.shape[1] - 1, gap.bit_length())])
                    s.append(val)
                m = max(s)
                w = [math.exp(x - m) for x in s]
                for j, wj in zip(js, w):
                    out[b, h, i] += wj / sum(w) * v[b, h, j]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_brute_force(causal):
    inputs = make_inputs(2, 2, 9, 4, "empty", True, dtype=torch.float64, seed=13, huge=True)
    inputs["key_mask"][1, 4] = False
    expected = _brute_force(
        *(inputs[n] for n in ("q", "k", "v", "key_mask")),
        causal,
        inputs["timestamps"],
        inputs["time_bias"],
        0.5,
    )
    got = semantic_attention_math(**inputs, causal=causal, scale=0.5)
    assert_close(got, expected, atol=1e-12, rtol=1e-10, name="math", scale_atol=False)
    got_sdpa = semantic_attention_sdpa(**inputs, causal=causal, scale=0.5)
    assert_close(got_sdpa, expected, atol=1e-12, rtol=1e-10, name="sdpa baseline", scale_atol=False)


def _edge_gaps():
    """Every power of two below 2**63 and its neighbours, 2**63 - 1, and random gaps."""
    vals = [0, 1, 2, 3, 10**9, 2**63 - 2, 2**63 - 1]
    for e in range(1, 63):
        vals += [2**e - 1, 2**e, 2**e + 1]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**62, (500,), generator=g) >> torch.randint(0, 62, (500,), generator=g)
    return torch.cat([torch.tensor(vals, dtype=torch.int64), rand])


@pytest.mark.parametrize("nb", [1, 2, 17, 32, 54, 55, 64, 100])
def test_time_bucket_is_exact(nb):
    """torch and numpy buckets equal min(nb - 1, int.bit_length) for every int64 gap >= 0."""
    gaps = _edge_gaps()
    expected = [min(nb - 1, int(x).bit_length()) for x in gaps.tolist()]
    assert time_bucket(gaps, nb).tolist() == expected
    assert time_bucket_np(gaps.numpy(), nb).tolist() == expected
    assert time_bucket_np(np.array(gaps.tolist()), nb).dtype == np.int64
    t = gaps[None, :]
    zero = torch.zeros(1, 1, dtype=torch.int64)
    tb = torch.arange(nb, dtype=torch.float64)[None, :]  # bias = bucket index
    assert bias_scores(zero, tb)[0, 0, 0].tolist() == [0.0]
    assert bias_scores(torch.cat([zero, t], 1), tb)[0, 0, 0, 1:].tolist() == expected


def test_timestamp_unit_is_documented_with_its_buckets():
    """Both docstrings say the unit (int64 seconds) and what milliseconds would do; the figures
    they give are the bucket function's: at NB = 32 the last bucket starts at 2**30, which is 34
    years in seconds and 12.4 days in milliseconds."""
    for doc in (semantic_attention.__doc__, SemanticAttention.__doc__):
        flat = " ".join(doc.split())
        assert "seconds" in flat and "int64" in flat, doc
        assert "2**30 s (34 years)" in flat and "2**30 ms (12.4 days)" in flat, doc
    assert time_bucket(torch.tensor([2**30 - 1, 2**30]), 32).tolist() == [30, 31]
    assert round(2**30 / 86400 / 365.25) == 34 and round(2**30 / 86400e3, 1) == 12.4
    day_ms, day_s = 86400 * 1000, 86400
    assert time_bucket(torch.tensor([13 * day_ms, 13 * day_s]), 32).tolist() == [31, 21]


def _bucket_forms():
    """(device, fast) pairs: the portable form wherever Triton runs, the GPU form (inline PTX)
    on CUDA only."""
    out = []
    if backends.interpret_mode():
        out.append(pytest.param("cpu", False, id="portable-cpu"))
    if CUDA:
        out += [pytest.param("cuda", False, id="portable-cuda")]
        out += [pytest.param("cuda", True, id="gpu-cuda", marks=pytest.mark.gpu)]
    return out


@pytest.mark.parametrize("device, fast", _bucket_forms())
@pytest.mark.parametrize("nb", [1, 2, 17, 32, 33, 54, 55, 64])
def test_kernel_bucket_function_equals_time_bucket(nb, device, fast):
    """Both forms of the kernels' bucket, on gaps of either sign (they bucket t_i - t_j), around
    every power of two and the ends of int64; 54/55 buckets straddle the float64 form's limit."""
    from spnn_fast.kernels.attention import gap_bucket_triton

    gaps = _edge_gaps()
    want = time_bucket(gaps, nb)
    assert torch.equal(gap_bucket_triton(gaps.to(device), nb, fast=fast).cpu(), want)
    assert torch.equal(gap_bucket_triton(-gaps.to(device), nb, fast=fast).cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the GPU form of the bias (inline PTX) runs on CUDA only")
@pytest.mark.parametrize("nb", [5, 32, 64])
def test_gpu_bias_form_matches_portable_form(nb, monkeypatch):
    """The launchers' GPU form (bucket by float64 exponent or bfind, lookup by warp shuffles)
    gives the output and gradients of the portable form (gathered load), huge gaps included."""
    from spnn_fast.kernels import attention as KA

    inputs = make_inputs(2, 3, 129, 32, "left", True, device="cuda", seed=nb, huge=True, nb=nb)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(9)).cuda()
    fast_out, fast_grads = run_op(inputs, True, "triton", g)
    monkeypatch.setattr(KA, "fast_bias_form", lambda: False)
    out, grads = run_op(inputs, True, "triton", g)
    for name, a, e in zip(("out",) + GRAD_NAMES, [fast_out] + fast_grads, [out] + grads):
        assert_close(a, e, name, rtol=1e-5, atol=1e-6)


def test_gradcheck_torch_path_float64():
    g = torch.Generator().manual_seed(21)
    B, H, L, D = 2, 2, 6, 3
    q, k, v = (
        torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    tb = torch.randn(H, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([[0, 1, 3, 9, 40, 41], [5, 5, 6, 100, 1000, 10**9]])
    mask = torch.tensor([[False, True, True, True, False, True], [True] * 6])
    for causal in (True, False):
        fn = lambda q, k, v, tb, causal=causal: semantic_attention(
            q,
            k,
            v,
            key_mask=mask,
            causal=causal,
            timestamps=ts,
            time_bias=tb,
            backend="torch",
        )
        assert torch.autograd.gradcheck(fn, (q, k, v, tb))


# ------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("optional", [True, False], ids=["mask+bias", "plain"])
def test_opcheck(backend, device, optional):
    inputs = make_inputs(2, 2, 7, 16, "left" if optional else "none", optional, device=device)
    ins, _ = _leaves(inputs)
    args = (
        ins["q"],
        ins["k"],
        ins["v"],
        ins["key_mask"],
        ins["timestamps"],
        ins["time_bias"],
        True,
        0.25,
        backend,
    )
    torch.library.opcheck(semantic_attention_fwd, args)
    out, lse = semantic_attention_fwd(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bwd_args = (torch.randn_like(out), *plain[:3], out.detach(), lse, *plain[3:], optional)
    torch.library.opcheck(semantic_attention_bwd, bwd_args)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_compiled_module_fullgraph(backend, device):
    torch.manual_seed(0)
    B, L, d_model, H = 2, 11, 32, 2
    module = SemanticAttention(d_model, H, num_time_buckets=16, backend=backend).to(device)
    with torch.no_grad():
        module.time_bias.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, d_model, generator=g).to(device)
    ts = make_timestamps(B, L, g).to(device)
    mask = make_mask("left", B, L, g).to(device)
    compiled = torch.compile(module, fullgraph=True)
    y = compiled(x, key_mask=mask, timestamps=ts)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    y_eager = module(x, key_mask=mask, timestamps=ts)
    y_eager.square().sum().backward()
    assert_close(y, y_eager, atol=1e-5, rtol=1e-5, name="compiled out", scale_atol=False)
    for (name, p), gc in zip(module.named_parameters(), grads):
        assert_close(gc, p.grad, atol=1e-5, rtol=1e-5, name=name, scale_atol=False)
    assert module.time_bias.grad.abs().sum() > 0


@pytest.mark.skipif(CUDA, reason="with a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper_as_launched(tmp_path):
    """Forward and backward compiled to sm_90 cubins as the launchers launch them (the GPU form of
    the bias, divisibility attributes, every head dim and dtype the kernels take): catches what
    the interpreter cannot, such as type changes of loop-carried values, dot shapes the hardware
    lacks, register spills and shared memory beyond the limit."""
    records = kernel_stats(tmp_path, "all", "attention")
    check_compiled(records, ("attention_fwd", "attention_bwd"), {"bf16", "fp16", "fp32"})
    variants = {(r["kernel"], r["variant"]) for r in records}
    assert variants == {(k, v) for k in ("attention_fwd", "attention_bwd")
                        for v in ("full", "no_bias")}  # fmt: skip
    assert all(r["config"]["FAST_BIAS"] for r in records)  # the form the interpreter never runs
    assert all(r["loop_sass"] > 0 for r in records)


# ------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------


def test_module_matches_reference_composition():
    torch.manual_seed(0)
    module = SemanticAttention(24, 3, num_time_buckets=8, backend="torch").double()
    with torch.no_grad():
        module.time_bias.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=g, dtype=torch.float64)
    ts = make_timestamps(2, 9, g)
    mask = make_mask("right", 2, 9, g)
    q, k, v = module.qkv(x).view(2, 9, 3, 3, 8).permute(2, 0, 3, 1, 4)
    o = semantic_attention_math(q, k, v, mask, True, ts, module.time_bias)
    expected = module.out_proj(o.transpose(1, 2).reshape(2, 9, 24))
    assert_close(
        module(x, key_mask=mask, timestamps=ts),
        expected,
        atol=1e-12,
        rtol=1e-10,
        name="module",
        scale_atol=False,
    )
    # Without timestamps the time bias is not used (and gets no gradient).
    o = semantic_attention_math(q, k, v, mask, True)
    expected = module.out_proj(o.transpose(1, 2).reshape(2, 9, 24))
    y = module(x, key_mask=mask)
    assert_close(
        y, expected, atol=1e-12, rtol=1e-10, name="module without timestamps", scale_atol=False
    )
    y.sum().backward()
    assert module.time_bias.grad is None
    assert "n_heads=3" in repr(module) and "num_time_buckets=8" in repr(module)


def test_module_dropout_and_bad_config():
    module = SemanticAttention(16, 2, dropout=0.5, backend="torch")
    x = torch.randn(2, 5, 16)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SemanticAttention(10, 3)
    with pytest.raises(ValueError, match="num_time_buckets"):
        SemanticAttention(16, 2, num_time_buckets=65)
    for kw, match in ((dict(n_heads=2.0), "n_heads must be an int, got float"),
                      (dict(n_heads=True), "n_heads must be an int, got bool"),
                      (dict(n_heads=2, num_time_buckets=8.5), "num_time_buckets must be an int")):  # fmt: skip
        with pytest.raises(TypeError, match=f"SemanticAttention: {match}"):
            SemanticAttention(16, **kw)
    with pytest.raises(ValueError, match=r"x must be \[B, L, 16\]"):
        module(torch.randn(2, 5, 8))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _bad(**changes):
    inputs = make_inputs(2, 3, 7, 16, "right", True)
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    (dict(q=torch.randn(3, 7, 16)), r"q must be \[B, H, L, D\].*\(3, 7, 16\)"),
    (dict(k=torch.randn(2, 3, 8, 16)), r"same shape.*k \(2, 3, 8, 16\)"),
    (dict(v=torch.randn(2, 3, 7, 32)), r"same shape.*v \(2, 3, 7, 32\)"),
    (dict(v=torch.randn(2, 3, 7, 16, dtype=torch.float64)), "share a dtype"),
    (
        dict(key_mask=torch.ones(2, 8, dtype=torch.bool)),
        r"key_mask must be \[B, L\]",
    ),
    (dict(key_mask=torch.ones(2, 7)), "key_mask must be bool"),
    (dict(timestamps=torch.zeros(2, 6, dtype=torch.int64)), r"timestamps must be \[B, L\]"),
    (dict(timestamps=torch.zeros(2, 7)), "timestamps must be integer"),
    (dict(timestamps=None), "timestamps .* required"),
    (dict(time_bias=torch.zeros(2, 32)), r"time_bias must be \[H, NB\] with H = 3.*\(2, 32\)"),
    (dict(time_bias=torch.zeros(3)), r"time_bias must be \[H, NB\]"),
    (dict(time_bias=torch.zeros(3, 65)), "1 <= NB <= 64"),
    (dict(time_bias=torch.zeros(3, 0)), "1 <= NB <= 64"),
    (dict(time_bias=torch.zeros(3, 4, dtype=torch.int64)), "time_bias must be floating"),
    (dict(key_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")), "is on meta"),
    (dict(key_mask=[[True] * 7] * 2), "key_mask must be a tensor or None"),
    (dict(time_bias=[[0.0] * 32] * 3), "time_bias must be a tensor or None"),
    ({n: torch.randn(2, 3, 7, 0) for n in "qkv"}, r"head dim D >= 1.*\(2, 3, 7, 0\)"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(scale="0.5"), "scale must be a finite number"),
]


@pytest.mark.parametrize("changes, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        semantic_attention(**_bad(**changes), backend="torch")


def test_the_mask_of_multihead_attention_is_refused_by_name():
    """``key_padding_mask`` means True = padding in nn.MultiheadAttention and True = real key
    here: passing it cannot silently invert the mask; the error names key_mask and both
    polarities."""
    inputs = _bad()
    mask = inputs.pop("key_mask")
    match = r"key_mask= \(bool \[B, L\], True where the key takes part.*True = padding"
    with pytest.raises(TypeError, match=match):
        semantic_attention(**inputs, key_padding_mask=~mask, backend="torch")
    module = SemanticAttention(32, 2)
    x, ts = torch.randn(2, 7, 32), inputs["timestamps"]
    with pytest.raises(TypeError, match=match):
        module(x, key_padding_mask=~mask[:, :7], timestamps=ts)
    # The documented argument, with its documented polarity, is the reference's.
    got = semantic_attention(**inputs, key_mask=mask, backend="torch")
    want = semantic_attention_math(*(inputs[n] for n in "qkv"), key_mask=mask, causal=True,
                                   timestamps=inputs["timestamps"], time_bias=inputs["time_bias"])  # fmt: skip
    assert_close(got, want, "out", atol=1e-5, rtol=1e-5)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="causal must be a bool"):
            semantic_attention(**inputs, key_mask=mask, causal=bad, backend="torch")
    with pytest.raises(TypeError, match="causal must be a bool"):
        SemanticAttention(32, 2, causal="no")


@pytest.mark.skipif(not backends.status()["triton"], reason="Triton cannot run here")
def test_triton_rejects_unsupported_head_dim_and_dtype():
    device = "cuda" if CUDA else "cpu"
    inputs = make_inputs(1, 2, 5, 136, "none", False, device=device)
    with pytest.raises(ValueError, match=r"head dims up to 128.*\(1, 2, 5, 136\)"):
        semantic_attention(**inputs, backend="TRITON")  # backend names are case-insensitive
    # "auto" falls back to the PyTorch path instead.
    semantic_attention(**inputs, backend="auto")
    inputs = make_inputs(1, 2, 5, 16, "none", False, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        semantic_attention(**inputs, backend="triton")


@pytest.mark.skipif(not backends.status()["triton"], reason="Triton cannot run here")
@pytest.mark.parametrize("D", [1, 8, 24, 48, 100])
def test_triton_pads_other_head_dims(D):
    """A head dim the kernels are not built for runs them on zero-padded q, k, v: the output and
    every gradient match the PyTorch path (which takes any D)."""
    device = "cuda" if CUDA else "cpu"
    inputs = make_inputs(2, 2, 37, D, "left", True, device=device, seed=D)
    g = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(5)).to(device)
    out, grads = run_op(inputs, True, "triton", g)
    want, want_grads = run_op(inputs, True, "torch", g)
    assert out.shape == (2, 2, 37, D)
    for name, a, e in zip(("out",) + GRAD_NAMES, [out] + grads, [want] + want_grads):
        assert_close(a, e, name, rtol=1e-4, atol=1e-5)


def test_kernels_take_their_limits_from_the_triton_free_module():
    """The kernels and the functional API's validation read one set of limits (spnn_fast.limits),
    so validation never imports Triton and the two cannot disagree."""
    pytest.importorskip("triton")
    from spnn_fast.kernels import attention, distill, feature_distill

    from spnn_fast import limits

    assert attention.SUPPORTED_HEAD_DIMS is limits.ATTN_HEAD_DIMS
    assert attention.SUPPORTED_DTYPES is limits.ATTN_DTYPES
    assert distill.MAX_DIM == limits.DISTILL_MAX_DIM
    assert feature_distill.MAX_K == limits.FEATURE_MAX_K


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid"):
        semantic_attention(**_bad(), backend="cuda-graphs")


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(2, 2, 0, 16), (2, 0, 4, 16), (0, 2, 4, 16)])
def test_empty_shapes_give_empty_results(backend, device, shape):
    """No rows, heads or sequences: an empty output and empty gradients, never a crash."""
    B, H, L, D = shape
    q = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    ts = torch.zeros(B, L, dtype=torch.int64, device=device)
    tb = torch.zeros(H, 4, device=device, requires_grad=True)
    out = semantic_attention(q, q, q, key_mask=mask, timestamps=ts, time_bias=tb, backend=backend)
    out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape
