"""Benchmarks run in two modes.

* measured: ``pytest benchmarks --benchmark-json=out.json`` (full sizes, timed)
* smoke:    ``pytest benchmarks --benchmark-disable`` (tiny sizes, each body runs once) so that
  CI keeps every benchmark runnable without spending minutes on it.
"""

import os

import _common
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    _common.SMOKE = bool(config.getoption("benchmark_disable", default=False))
