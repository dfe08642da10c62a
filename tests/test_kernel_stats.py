"""benchmarks/kernel_stats.py: the offline reading of the kernels compiled for sm_90.

The SASS reading and the specialization rule are checked on their own; the whole instrument runs
on the benchmark shapes (no GPU needed) and its records must meet the offline goals, like the
committed ``benchmarks/results/sm90_kernel_stats.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _utils import KERNEL_STATS, kernel_stats, load_kernel_stats

ks = load_kernel_stats()
COMMITTED = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sm90_kernel_stats.json"
)


def _sass(lines):
    """cuobjdump-style listing: one instruction per 16 bytes."""
    return [(16 * i, ins) for i, ins in enumerate(lines)]


def test_loop_sass_counts_the_innermost_loops_holding_mma():
    code = _sass(
        [
            "MOV R1, c[0x0][0x28]",  # 0: prologue
            "IADD3 R2, R2, 0x1, RZ",  # 1: outer loop (key blocks) starts
            "LDG.E R4, desc[UR4][R2.64]",  # 2: tile loop starts
            "HMMA.16816.F32.BF16 R8, R4, R6, R8",  # 3
            "NOP",  # 4: padding, not counted
            "FADD R9, R9, R8",  # 5: histogram loop (no MMA) nested in the tile loop
            "@P0 BRA 0x50",  # 6: back to 5
            "@!P1 BRA 0x20",  # 7: back to 2, closes the tile loop
            "STG.E desc[UR4][R2.64], R9",  # 8
            "@P2 BRA 0x10",  # 9: back to 1, closes the outer loop
            "EXIT",  # 10
            "BRA 0xb0",  # 11: the trap after EXIT branches to itself
        ]
    )
    assert ks.loop_sass(code) == 5  # instructions 2-7 without the NOP
    no_mma = [(a, i.replace("HMMA.16816.F32.BF16", "FFMA")) for a, i in code]
    assert ks.loop_sass(no_mma) == 0  # no tile loop on tensor cores
    assert ks.loop_sass(no_mma, fma_dots=True) == 5  # IEEE fp32 dots: FFMA marks the tile loop
    assert ks.loop_sass(code[:3]) == 0  # no loop at all


def _launch(values, flags):
    """A Launch of a stand-in kernel: ``flags[name] = (is_constexpr, do_not_specialize)``."""
    params = [
        SimpleNamespace(name=n, is_constexpr=c, do_not_specialize=d) for n, (c, d) in flags.items()
    ]
    fn = SimpleNamespace(params=params, __name__="_k")
    return ks.Launch(fn=fn, args=values, options={}, grid=(1,))


def test_specialize_follows_the_jit_rules():
    meta = torch.device("meta")
    values = dict(
        P=torch.empty(4, dtype=torch.bfloat16, device=meta),
        M=torch.empty(4, dtype=torch.uint8, device=meta),
        one=1, sixty_four=64, seven=7, L=32, big=2**40, scale=0.5, flag=True, opt=None, BLOCK=64,
    )  # fmt: skip
    flags = {n: (n == "BLOCK", n == "L") for n in values}
    signature, constexprs, attrs = ks.specialize(_launch(values, flags))
    assert signature == dict(
        P="*bf16", M="*u8", one="constexpr", sixty_four="i32", seven="i32", L="i32", big="i64",
        scale="fp32", flag="u1", opt="constexpr", BLOCK="constexpr",
    )  # fmt: skip
    assert constexprs == dict(one=1, opt=None, BLOCK=64)
    divisible = [["tt.divisibility", 16]]
    # Pointers and ints divisible by 16, except the one the kernel does not specialize (L).
    assert attrs == {(0,): divisible, (1,): divisible, (3,): divisible, (6,): divisible}


_JIT_COMPARISON = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("kernel_stats", sys.argv[1])
    ks = importlib.util.module_from_spec(spec)
    sys.modules["kernel_stats"] = ks
    spec.loader.exec_module(ks)
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        print("SKIP", e)
        raise SystemExit
    compared = 0
    for case in ks.cases("benchmark"):
        with ks._sm90_device(), ks.capture() as launches:
            case.call()
        for launch in launches:
            fn = launch.fn
            backend = make_backend(GPUTarget("cuda", 90, 32))
            try:
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                values = [launch.args[p.name] for p in fn.params]
                bound, specialization, options = binder(*values, **launch.options)
                _, sig, consts, attrs = fn._pack_args(
                    backend, launch.options, bound, specialization, options
                )
            except Exception as e:  # another Triton's internals: nothing to compare with
                print("SKIP", type(e).__name__, e)
                raise SystemExit
            ours_sig, ours_consts, ours_attrs = ks.specialize(launch)
            names = [p.name for p in fn.params]
            jit_consts = {names[k[0]]: v for k, v in consts.items()}
            assert sig == ours_sig, (fn.__name__, sig, ours_sig)
            assert jit_consts == ours_consts, (fn.__name__, jit_consts, ours_consts)
            assert {k: v for k, v in attrs.items() if v} == ours_attrs, (fn.__name__, attrs)
            compared += 1
    print("COMPARED", compared)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_specialize_matches_the_jit_on_every_benchmark_launch():
    """Where this Triton exposes its launch binder, its signature, constants and divisibility
    attributes for each launch equal ours (so kernel_stats compiles what the JIT would)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _JIT_COMPARISON, str(KERNEL_STATS)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    if last.startswith("SKIP"):
        pytest.skip(f"this Triton's launch binder differs: {last}")
    assert last.startswith("COMPARED") and int(last.split()[1]) > 0


def _check_goals(records):
    ks.check_records(records)
    kinds = {(r["kernel"], r["variant"], r["dtype"]) for r in records}
    for kernel in ("attention_fwd", "attention_bwd"):
        assert {(kernel, v, "bf16") for v in ("full", "no_bias")} <= kinds
    for kernel in ("distill_fwd", "distill_bwd_items", "feature_distill_fwd"):
        assert any(k == kernel for k, _, _ in kinds), kernel
    assert {r["config"]["alpha"] for r in records if "alpha" in r["config"]} == {0.0, 0.5}
    missed = [g for g in ks.goals(records) if not g[3]]
    assert not missed, missed


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_benchmark_kernels_meet_the_offline_goals(tmp_path):
    """The smoke run of the instrument: every kernel at the benchmark shapes, compiled here with
    this Triton, has the documented records, spills nothing, keeps the attention's bias within
    1.5x (forward) and 1.8x (backward with its gradient) of the bias-free tile loop, and the
    distillation loss passes over the logits at most twice per call."""
    _check_goals(kernel_stats(tmp_path, "benchmark"))


def test_committed_kernel_stats_meet_the_offline_goals():
    with open(COMMITTED) as f:
        records = json.load(f)
    _check_goals(records)
    assert all(r["config"]["target"] == "sm_90" for r in records)


def test_bad_case_set_is_refused():
    with pytest.raises(ValueError, match="unknown case set 'fast'"):
        ks.cases("fast")
    with pytest.raises(ValueError, match="unknown families"):
        ks.cases("benchmark", ["attn"])
