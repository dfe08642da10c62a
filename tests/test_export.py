"""Programs that use the package's ops, exported (``torch.export``) or packaged by AOTInductor,
load and run in a new process after ``import spnn_fast`` alone: importing the package registers
every op of spnn_fast/ops/, without importing Triton."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import spnn_fast.functional as SF
import spnn_fast.nn as snn

OPS = Path(__file__).resolve().parents[1] / "spnn_fast" / "ops"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _op_names():
    """Every ``spnn_fast::name`` that a module of spnn_fast/ops/ registers."""
    names = {}
    for path in sorted(OPS.glob("*.py")):
        found = re.findall(r'custom_op\(\s*"spnn_fast::(\w+)"', path.read_text())
        if found:
            names[path.stem] = found
    return names


def test_import_registers_every_op_without_triton():
    """A fresh process where Triton cannot be imported: ``import spnn_fast`` registers every op
    and imports neither Triton nor the kernels."""
    names = _op_names()
    assert sorted(names) == [
        "attention",
        "distill",
        "distill_ensemble",
        "feature_distill",
        "sampled_softmax",
        "topk",
    ]
    out = _run(
        """
        import sys, warnings
        sys.modules["triton"] = None  # import triton fails, as where it is not installed
        warnings.simplefilter("ignore")  # the warning that Triton is missing
        import torch
        import spnn_fast

        missing = []
        for name in sys.argv[1:]:
            try:
                getattr(torch.ops.spnn_fast, name).default
            except (AttributeError, RuntimeError):
                missing.append(name)
        loaded = sorted(m for m, module in sys.modules.items()
                        if module is not None and m.startswith(("spnn_fast.kernels", "triton")))
        print(missing, loaded)
        """,
        *[n for found in names.values() for n in found],
    )
    assert out.split() == ["[]", "[]"], out


class _Ported(torch.nn.Module):
    """A small SASRec-like scorer: attention with the time bias, the fused loss, top-k (the
    named tuple itself is an output)."""

    def __init__(self, d: int = 16, v: int = 30) -> None:
        super().__init__()
        self.attn = snn.SemanticAttention(d, 2, num_time_buckets=8, backend="torch")
        self.items = torch.nn.Parameter(torch.randn(v + 1, d, generator=torch.Generator()))
        with torch.no_grad():
            self.attn.time_bias.normal_(generator=torch.Generator().manual_seed(1))

    def forward(self, x, mask, timestamps, target, offsets, seen):
        h = self.attn(x, key_mask=mask, timestamps=timestamps)[:, -1]
        loss = SF.linear_cross_entropy(h, self.items, target, backend="torch")
        return loss, SF.topk_scores(h, self.items, 5, exclude=(offsets, seen), backend="torch")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The exported program, its inputs and the eager outputs, saved in a folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    model = _Ported().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 16, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False
    timestamps = torch.randint(0, 10**6, (3, 7), generator=g).sort(dim=1).values
    target = torch.tensor([4, 17, 30])
    offsets, seen = torch.tensor([0, 2, 2, 5]), torch.tensor([3, 9, 1, 2, 30])
    inputs = (x, mask, timestamps, target, offsets, seen)
    with torch.no_grad():
        loss, top = model(*inputs)
    want = [loss, top.values, top.indices]
    program = torch.export.export(model, inputs)
    torch.export.save(program, folder / "model.pt2")
    torch.save({"inputs": inputs, "want": want}, folder / "io.pt")
    return folder, program


_CHECK = """
    import sys
    import torch
    import spnn_fast  # registers the ops; nothing else of the package is imported here

    folder = sys.argv[1]
    io = torch.load(folder + "/io.pt")
    model = LOAD
    with torch.no_grad():
        got = model(*io["inputs"])
    torch.testing.assert_close([got[0], *got[1]], io["want"])
    print(type(got[1]).__name__)
"""


def test_exported_program_loads_in_a_new_process(exported):
    folder, _ = exported
    load = 'torch.export.load(folder + "/model.pt2").module()'
    assert _run(_CHECK.replace("LOAD", load), str(folder)).split() == ["TopK"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_loads_in_a_new_process(exported):
    """AOTInductor compiles the program to a shared library (about half a minute on 2 CPU
    cores); the package's ops run through Python, so the process imports spnn_fast first."""
    folder, program = exported
    torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "model_aoti.pt2"))
    load = 'torch._inductor.aoti_load_package(folder + "/model_aoti.pt2")'
    assert _run(_CHECK.replace("LOAD", load), str(folder)).split() == ["TopK"]
