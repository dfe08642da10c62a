"""The GPU check's scripts, run without a GPU: the plan of ``benchmarks/gpu_check.sh`` and the
JSON that ``benchmarks/gpu_quick.py`` writes (its ``--dry-run`` times the PyTorch path at tiny
sizes on the CPU), so that the first GPU run cannot fail on a slip of the script."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SUMMARY_KEYS = ["op", "shape", "mode", "ours_ms", "baseline", "baseline_ms"]
BASELINES = {
    "sdpa_float_mask",
    "flex_compiled",
    "sdpa_flash_causal_nobias",
    "naive_eager",
    "naive_compiled",
    "torch_lce",
    "torch_lce_chunked",
}


def _gpu_quick():
    spec = importlib.util.spec_from_file_location("gpu_quick", BENCH / "gpu_quick.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(*args):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    proc = subprocess.run(
        [bash, str(BENCH / "gpu_check.sh"), *args, "--dry-run"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ONLY": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^step (\S+) limit (\d+) s", proc.stdout, re.M)
    total, limit = map(int, re.search(r"total (\d+) s .* run limit (\d+) s", proc.stdout).groups())
    return [name for name, _ in steps], total, limit


def test_gpu_check_plans_fit_their_time_limits():
    """--quick: install, the headline comparisons, then the GPU tests, all limits inside five
    minutes; the full run adds the other comparisons and training inside eight."""
    names, total, limit = _plan("--quick")
    assert names == ["install", "gpu-info", "bench-headline", "tests-gpu"]
    assert limit == 300 and total <= limit
    names, total, limit = _plan()
    assert names[:4] == ["install", "gpu-info", "bench-headline", "tests-gpu"]
    assert {"bench-more", "train-cuda"} <= set(names) and "tune" not in names
    assert limit == 480 and total <= limit


def test_gpu_check_refuses_unknown_arguments_and_steps():
    bash = shutil.which("bash") or pytest.skip("no bash here")
    script = str(BENCH / "gpu_check.sh")
    proc = subprocess.run([bash, script, "--fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
    proc = subprocess.run(
        [bash, script, "--dry-run"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "ONLY": "bench-everything"},
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown step 'bench-everything'" in proc.stderr


def test_card_folder_names():
    gq = _gpu_quick()
    assert gq.card_slug("NVIDIA H200") == "h200"
    assert gq.card_slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert gq.card_slug("") == "unknown"


def _run_dry(out: Path, set_name: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_quick.py"), "--dry-run", "--out", str(out),
         "--set", set_name],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "quick.json") as f:
        return json.load(f)


def test_gpu_quick_dry_run_writes_the_summary(tmp_path):
    summary = _run_dry(tmp_path, "headline")
    assert set(summary) == {"card", "bias_form", "comparisons", "skipped"}
    assert summary["card"] == "cpu (dry run)"
    assert summary["bias_form"]["form"] in ("portable", None), summary["bias_form"]
    rows = summary["comparisons"]
    assert {r["op"] for r in rows} == {"attention", "distill"}
    assert {r["mode"] for r in rows if r["op"] == "attention"} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert list(r) == SUMMARY_KEYS
        assert r["baseline"] in BASELINES
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0
    shapes = [r["shape"] for r in rows if r["op"] == "attention"]
    assert len({(s["L"], s["D"]) for s in shapes}) == 3  # the headline shape and two others
    assert {r["shape"]["alpha"] for r in rows if r["op"] == "distill"} == {0.0, 0.5}
    # The compiled baselines do not run in a dry run: reported, with the reason.
    skipped = {r["baseline"] for r in summary["skipped"]}
    assert {"flex_compiled", "naive_compiled"} <= skipped
    assert all(r["reason"] for r in summary["skipped"])
    lines = [json.loads(x) for x in (tmp_path / "quick.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) + len(summary["skipped"])
    assert all(x["card"] == "cpu (dry run)" for x in lines)
    matched = [x["matches_ours"] for x in lines if x["baseline"] == "sdpa_float_mask"]
    assert matched and all(matched)  # the baseline computes what ours does
    # A second set of the same run adds to the summary instead of replacing it.
    more = _run_dry(tmp_path, "more")
    assert more["comparisons"][: len(rows)] == rows
    assert any(r["shape"].get("V") == 5000 for r in more["comparisons"])
