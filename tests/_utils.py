"""Helpers shared by the op tests: a verbose allclose, Triton availability, sm_90 compilation."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from spnn_fast import backends

TRITON_OK = backends.status()["triton"]
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="Triton cannot run here (no GPU and no TRITON_INTERPRET=1)"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close(actual, expected, name="tensor", *, rtol=1e-4, atol=1e-5, scale_atol=True):
    """Elementwise ``|a - e| <= atol' + rtol * |e|`` in float64 on the CPU, where ``atol'`` is
    ``atol * (1 + max|e|)`` with ``scale_atol`` (the default) and ``atol`` without. Fails on a
    shape mismatch or a non-finite value, and says how many elements differ, where the first one
    is and where the largest difference is."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs()
    bad = diff > (atol * (1 + scale) if scale_atol else atol) + rtol * e.abs()
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol:.2e}"
            f"{' x (1 + max|e|)' if scale_atol else ''}, rtol={rtol:.2e}, max|e|={scale:.3e}); "
            f"first at {first}: {a[first].item():.8g} vs {e[first].item():.8g}; "
            f"max |diff| {diff.max().item():.3e} at {worst}"
        )


def run_without_interpreter(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python without ``TRITON_INTERPRET`` (to compile kernels ahead of
    time for a GPU this machine lacks); skips when this Triton has no such compile API."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {e}")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource takes other arguments")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
