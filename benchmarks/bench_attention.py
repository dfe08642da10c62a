"""Semantic attention: the fused op against eager math, SDPA and FlexAttention, in one run.

Every configuration has a padding mask (right padding, lengths uniform in [L/4, L]), causal
masking and, but in the ``no_bias`` groups, the time bias (NB = 32, timestamps with gaps from 0
to 1e9 s). Implementations:

* ``spnn_fast[triton]`` - the fused kernels (CUDA only: the interpreter is not a benchmark)
* ``spnn_fast[torch]``  - the PyTorch path (chunked recomputation)
* ``eager``             - ``semantic_attention_math``: full [B, H, L, L] scores, autograd
* ``sdpa``              - ``scaled_dot_product_attention`` with mask + bias as one float mask
* ``sdpa_bool``         - without the bias (the ``no_bias`` groups): SDPA with the padding and
                          causality as one boolean mask, against the op without a time bias
* ``flex``              - compiled FlexAttention, bias as ``score_mod``; its block mask is built
                          outside the timed region (favouring it); no CPU backward in torch

Modes: ``fwd`` (under no_grad) and ``fwd+bwd`` (gradients of q, k, v and time_bias). Each result
carries ``peak_bytes`` (extra memory at peak) in ``extra_info``; groups hold one configuration.
Dtype: bfloat16 on CUDA, float32 on the CPU.

    pytest benchmarks/bench_attention.py --benchmark-json=out.json   # measured
    pytest benchmarks/bench_attention.py --benchmark-disable         # smoke (tiny sizes)
"""

from __future__ import annotations

import functools

import _common
import pytest
import torch

from spnn_fast import backends
from spnn_fast.functional import semantic_attention
from spnn_fast.reference.attention import semantic_attention_math
from spnn_fast.reference.attention_baselines import (
    flex_unavailable_reason,
    semantic_attention_flex,
    semantic_attention_sdpa,
    semantic_attention_sdpa_bool,
)

DEV = _common.device()
CUDA = DEV.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
NB = 32

# One FlexAttention graph per (shape, grad mode): more than dynamo's default limit of 8.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

if _common.SMOKE:
    CONFIGS = [(2, 2, 16, 16)]
else:
    CONFIGS = [
        (B, H, L, D) for (B, H) in [(256, 2), (1024, 4)] for L in [50, 200] for D in [32, 64]
    ]
IMPLS = ["spnn_fast[triton]", "spnn_fast[torch]", "eager", "sdpa", "flex", "sdpa_bool"]
BIAS_IMPLS = {
    "time_bias": IMPLS[:-1],
    "no_bias": ["spnn_fast[triton]", "spnn_fast[torch]", "sdpa_bool"],
}
MODES = ["fwd", "fwd+bwd"]


def _cfg_id(cfg) -> str:
    return "B{}-H{}-L{}-D{}".format(*cfg)


@functools.lru_cache(maxsize=1)
def _inputs(cfg):
    """Inputs of one configuration (cached: the large CPU ones take seconds to build)."""
    B, H, L, D = cfg
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEV, DTYPE) for _ in range(3))
    lengths = torch.randint(max(1, L // 4), L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(DEV)
    scales = torch.tensor([0, 1, 60, 3600, 86400, 10**7, 10**9], dtype=torch.float64)
    gaps = scales[torch.randint(0, len(scales), (B, L), generator=g)]
    gaps = (gaps * torch.rand(B, L, generator=g, dtype=torch.float64)).to(torch.int64)
    ts = (torch.cumsum(gaps, dim=1) + 1_700_000_000).to(DEV)
    tb = (0.5 * torch.randn(H, NB, generator=g)).to(DEV, DTYPE)
    return dict(q=q, k=k, v=v, key_mask=mask, timestamps=ts, time_bias=tb)


def _skip_reason(impl: str, mode: str, cfg, bias: str = "time_bias") -> str | None:
    B, H, L, D = cfg
    if impl not in BIAS_IMPLS[bias]:
        return f"{impl} is not compared in the {bias} groups"
    if impl == "spnn_fast[triton]" and not CUDA:
        return "Triton kernels are benchmarked on CUDA only (on the CPU they run interpreted)"
    if impl == "flex":
        reason = flex_unavailable_reason(DEV, backward=mode == "fwd+bwd")
        if reason:
            return reason
        if _common.SMOKE:
            return "smoke run: compiling FlexAttention takes tens of seconds per shape"
        if CUDA and (L, D) != (200, 64):
            return "on the GPU FlexAttention is measured at L=200, D=64 only (its compile time)"
    return None


def _callable(impl: str, inputs: dict):
    if impl.startswith("spnn_fast["):
        backend = impl[len("spnn_fast[") : -1]
        return lambda **kw: semantic_attention(**kw, causal=True, backend=backend)
    if impl == "sdpa_bool":
        return lambda q, k, v, key_mask, **_: semantic_attention_sdpa_bool(q, k, v, key_mask)
    fn = {"eager": semantic_attention_math, "sdpa": semantic_attention_sdpa}.get(impl)
    if fn is not None:
        return lambda **kw: fn(**kw, causal=True)
    # FlexAttention: build the block mask once, outside the timed region.
    from torch.nn.attention.flex_attention import create_block_mask

    mask, L = inputs["key_mask"], inputs["q"].shape[2]
    block_mask = create_block_mask(
        lambda b, h, qi, kj: (kj <= qi) & mask[b, kj], mask.shape[0], None, L, L, device=DEV
    )
    return lambda **kw: semantic_attention_flex(**kw, causal=True, block_mask=block_mask)


def _runner(impl: str, mode: str, inputs: dict):
    fn = _callable(impl, inputs)
    if mode == "fwd":

        def run():
            with torch.no_grad():
                out = fn(**inputs)
            _common.sync(DEV)
            return out

        return run
    leaves = {n: inputs[n].detach().requires_grad_(True) for n in ("q", "k", "v", "time_bias")
              if inputs[n] is not None}  # fmt: skip
    args = {**inputs, **leaves}
    grad_out = torch.randn_like(inputs["q"])

    def run():
        out = fn(**args)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
        _common.sync(DEV)
        return grads

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", list(BIAS_IMPLS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_semantic_attention(benchmark, impl, mode, bias, cfg):
    reason = _skip_reason(impl, mode, cfg, bias)
    if reason:
        pytest.skip(reason)
    B, H, L, D = cfg
    benchmark.group = f"semantic_attention {mode} {_cfg_id(cfg)}" + (
        "" if bias == "time_bias" else " no_bias"
    )
    inputs = _inputs(cfg)
    if bias == "no_bias":
        inputs = {**inputs, "timestamps": None, "time_bias": None}
    try:
        run = _runner(impl, mode, inputs)
        result = run()  # compiles what needs compiling
    except Exception as e:  # a baseline this torch lacks is skipped; the fast path must run
        if impl != "flex":
            raise
        pytest.skip(f"FlexAttention failed here ({type(e).__name__}: {str(e)[:200]})")
    if mode == "fwd":
        # A baseline that computes something else is no baseline: check it once, untimed.
        expected = semantic_attention(**inputs, causal=True, backend="torch")
        tol = 6e-2 if DTYPE == torch.bfloat16 else 1e-4
        torch.testing.assert_close(result.float(), expected.float(), atol=tol, rtol=tol)
    del result
    peak = _common.peak_memory(run, DEV)
    rounds = _common.adaptive_rounds(run, DEV) if CUDA else 3
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if CUDA else 0, iterations=1)
    scores_bytes = B * H * L * L * torch.finfo(DTYPE).bits // 8
    _common.record(
        benchmark,
        impl=impl,
        baseline_of=None if impl.startswith("spnn_fast") else "spnn_fast",
        peak_bytes=peak,
        bhll_bytes=scores_bytes,
        mode=mode,
        bias=bias,
        B=B,
        H=H,
        L=L,
        D=D,
        NB=NB,
        dtype=str(DTYPE).replace("torch.", ""),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        backend_status=backends.status(),
        torch=torch.__version__,
    )
