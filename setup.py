"""Builds the C++ extension ``spnn_fast._C``.

The extension is written against pybind11 and numpy buffers only, never against libtorch, so one
build works with every torch version the package supports. Everything else lives in pyproject.toml.
"""

import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Compile the translation units in parallel (setuptools compiles them one by one otherwise).
ParallelCompile("SPNN_FAST_BUILD_JOBS", default=0).install()

extra_compile_args = ["-O3"]
extra_link_args = []
if sys.platform != "win32":
    extra_compile_args += ["-fvisibility=hidden", "-pthread"]
    extra_link_args += ["-pthread"]
if os.environ.get("SPNN_FAST_DEBUG") == "1":
    extra_compile_args = ["-O0", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link_args += ["-fsanitize=address,undefined"]

ext_modules = [
    Pybind11Extension(
        "spnn_fast._C",
        sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
