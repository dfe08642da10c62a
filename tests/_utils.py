"""Helpers shared by the op tests: a verbose allclose, Triton availability, sm_90 compilation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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


KERNEL_STATS = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_stats.py"
SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def load_kernel_stats():
    """``benchmarks/kernel_stats.py`` as a module (it needs no Triton to import)."""
    if "kernel_stats" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kernel_stats", KERNEL_STATS)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernel_stats"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["kernel_stats"]


def kernel_stats(tmp_path, cases: str = "benchmark", family: str = "") -> list:
    """Compile the package's kernels for sm_90 as their launchers launch them (``kernel_stats.py``
    in a fresh Python without ``TRITON_INTERPRET``) and return its records; skips when this
    Triton cannot compile ahead of time."""
    pytest.importorskip("triton")
    reason = load_kernel_stats().compile_unavailable_reason(here=False)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "kernel_stats.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(KERNEL_STATS), "--cases", cases, "--json", str(out)]
    if family:
        cmd += ["--family", family]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def check_compiled(records: list, families: tuple, dtypes: set) -> None:
    """Every family and dtype compiled; no fp16/bf16 kernel spills registers; every kernel fits
    sm_90's shared memory."""
    assert {r["dtype"] for r in records} == dtypes
    for family in families:
        assert any(r["kernel"].startswith(family) for r in records), family
    for r in records:
        what = f"{r['kernel']} {r['variant']} {r['dtype']} {r['config']}"
        assert r["shared_bytes"] <= SM90_SHARED_LIMIT, f"{what}: {r['shared_bytes']} B shared"
        if r["dtype"] != "fp32":
            assert r["spill_bytes"] == 0, f"{what}: spills {r['spill_bytes']} B"
