"""The package's shape: each module imports only the layers below it (lazy imports inside
functions included), and no module grows past what a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import spnn_fast modules of lower layers only; the package's
# __init__ and __main__ sit above all.
LAYERS = [
    {"_C"},
    {"_ext", "limits", "_checks", "_io", "_lock", "_threads", "_tables", "distributed", "metrics"},
    {"reference", "sampling", "_arrow"},
    {"backends", "_formats", "download", "kernels"},
    {"ops", "encode", "log", "fingerprint"},
    {"functional", "protocol", "data"},
    {"nn", "windows"},
    {"model", "trainconfig"},
    {"config", "evaluation"},
    {"objective", "runfolder", "report", "distill_report"},
    {"teacher"},
    {"train"},
    {"experiment"},
    {"distill_record"},
    {"recommend", "distill_run"},
    {"cli"},
]  # fmt: skip
MAX_LINES = 450


def _files():
    yield from (ROOT / "spnn_fast").rglob("*.py")
    yield from (ROOT / "kernels").glob("*.py")


def _unit(path: Path) -> str:
    """The layer unit of a file: its top-level module (a subpackage counts as one)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    return rel.parts[1] if len(rel.parts) > 2 else rel.stem


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"spnn_fast.{unit} is in no layer of tests/test_layout.py")


def _imports(path: Path):
    """(line, imported unit) of every spnn_fast import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "spnn_fast":
                names = [a.name for a in node.names]
            elif node.module.startswith("spnn_fast."):
                names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("spnn_fast.")]
        for name in names:
            yield node.lineno, name


@pytest.mark.parametrize("path", sorted(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_import_only_lower_layers(path):
    unit = _unit(path)
    if unit in ("__init__", "__main__"):
        return
    mine = _layer(unit)
    wrong = [f"line {line}: spnn_fast.{dep} (layer {_layer(dep)})"
             for line, dep in _imports(path) if dep != unit and _layer(dep) >= mine]  # fmt: skip
    assert not wrong, f"{path.name} (layer {mine} in tests/test_layout.py) imports " + "; ".join(
        wrong
    )


@pytest.mark.parametrize(
    "path", sorted((ROOT / "spnn_fast").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"
