"""Compile every Triton kernel of spnn_fast for sm_90 as its launcher launches it; report the cost.

    python benchmarks/kernel_stats.py [--json FILE] [--cases benchmark|compile-check|all] [--family attention,...]

No GPU is needed: each launcher (``spnn_fast.kernels.*``) is called with tensors on the ``meta``
device at the benchmark shapes, and its kernel launches are intercepted instead of run. Every
intercepted launch is compiled for sm_90 with the arguments the JIT would specialize on: the
same constexprs, ``num_warps``/``num_stages``, integer arguments equal to 1 folded to constants,
and ``tt.divisibility = 16`` on every pointer and on every integer divisible by 16 (unless the
kernel says ``do_not_specialize``). Launch parameters therefore come from the launchers' own
config functions; nothing is copied here. The one fact a meta tensor cannot give, the number of
streaming multiprocessors, is set to :data:`SM90_SMS` (an H100 SXM or H200).

Then ``cuobjdump`` and the SASS from the Triton wheel's ``nvidia/bin`` give one record per kernel
and variant::

    {"kernel": str, "variant": str, "dtype": str, "config": {...}, "registers": int,
     "spill_bytes": int, "shared_bytes": int, "loop_sass": int}

* ``config``: the constexprs, ``num_warps``, ``num_stages`` and the case's shape parameters.
* ``registers``: per thread; ``spill_bytes``: the stack frame per thread (0 unless ptxas spilled
  registers to local memory); ``shared_bytes``: the dynamic shared memory of a block.
* ``loop_sass``: the SASS instructions (NOPs excluded) of the loop that processes one score tile
  (attention: a query-tile x key-tile pair; losses: a row-tile x item-tile pair). Loops are found
  from the backward branches; the tile loops are the innermost loops that hold tensor-core (MMA)
  instructions, and their sizes are summed (a design that visits each tile pair in two loops
  pays both). A loop nested inside a tile loop is counted once, however often it runs; a kernel
  without a loop reports 0.

Cases: ``benchmark`` (the committed ``results/sm90_kernel_stats.json``): attention forward and
backward at B=1024, H=4, L=200, D=64 in bf16, ``full`` (padding mask, causal, time bias and, in
the backward, its gradient) and ``no_bias``; each distillation and feature-loss kernel at
N=16384, V=10^5, D=64 in bf16, alpha 0 and 0.5, ``full``. ``compile-check``: the other dtypes,
head dims, lengths and widths the tests compile (fp16/fp32, D = 16 to 128, L = 20 to 512, 64
buckets, 256-wide distillation rows, K = 8192).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Kernels decorated under the interpreter cannot be compiled: this must precede any Triton import.
# FP fusion on, as the JIT's default (Triton 3.9 warns when the variable is unset).
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

__all__ = [
    "SM90_SMS",
    "Case",
    "Launch",
    "cases",
    "capture",
    "compile_launch",
    "compile_unavailable_reason",
    "loop_sass",
    "main",
    "record",
    "run_cases",
    "specialize",
]

# Streaming multiprocessors of the sm_90 card the launch parameters are computed for.
SM90_SMS = 132
SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90

_TORCH_TO_TRITON = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def compile_unavailable_reason(here: bool = True) -> Optional[str]:
    """None when this Triton can compile for sm_90 ahead of time, else why not. ``here=False``
    leaves out this process's ``TRITON_INTERPRET`` (a test that runs the script without it)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction  # noqa: F401
    except ImportError as e:
        return f"this Triton has no ahead-of-time compile API: {e}"
    params = inspect.signature(ASTSource).parameters
    if not {"constexprs", "attrs"} <= set(params):
        return f"this Triton's ASTSource takes other arguments: {list(params)}"
    if here and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: kernels are interpreted, not compiled"
    missing = [t for t in ("cuobjdump", "ptxas") if not os.path.exists(_tool(t))]
    if missing:
        return f"the Triton wheel ships no {', '.join(missing)} (looked in {_tool('')})"
    return None


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ---------------------------------------------------------------------------------------------
# Intercepting the launchers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel, its bound arguments, the options."""

    fn: Any  # triton.runtime.jit.JITFunction
    args: Dict[str, Any]
    options: Dict[str, Any]
    grid: Any

    @property
    def name(self) -> str:
        return self.fn.__name__


@contextlib.contextmanager
def capture():
    """Within the block, Triton kernel launches are recorded (a list of :class:`Launch`) and not
    run, so a launcher can be called on ``meta`` tensors."""
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = set(self.arg_names)
        bound = inspect.signature(self.fn).bind(
            *args, **{k: v for k, v in kwargs.items() if k in names}
        )
        bound.apply_defaults()
        options = {k: v for k, v in kwargs.items() if k not in names}
        launches.append(Launch(self, dict(bound.arguments), options, grid))

    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original


def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    return "i64" if -(2**63) <= v < 2**63 else "u64"


def specialize(launch: Launch) -> Tuple[Dict[str, str], Dict[str, Any], Dict[tuple, list]]:
    """(signature, constexprs, attrs) of ``triton.compiler.ASTSource`` for ``launch``, with the
    JIT's own rules: a pointer gets ``tt.divisibility = 16`` (PyTorch allocations are aligned);
    an integer gets it when divisible by 16 and becomes the constant 1 when equal to 1, unless
    the kernel marks it ``do_not_specialize``; floats and bools are not specialized."""
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[tuple, list] = {}
    divisible = [["tt.divisibility", 16]]
    for i, p in enumerate(launch.fn.params):
        v = launch.args[p.name]
        if p.is_constexpr or v is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        specialize_value = not p.do_not_specialize
        align = not getattr(p, "do_not_specialize_on_alignment", False)
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[v.dtype]
            if align:
                attrs[(i,)] = divisible
        elif isinstance(v, bool):
            signature[p.name] = "u1"
        elif isinstance(v, int):
            if specialize_value and v == 1:
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
                continue
            signature[p.name] = _int_type(v)
            if specialize_value and align and v % 16 == 0:
                attrs[(i,)] = divisible
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: argument {p.name} of type {type(v).__name__}")
    return signature, constexprs, attrs


def compile_launch(launch: Launch):
    """The launch compiled for sm_90 (a ``triton.compiler.CompiledKernel``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(launch.options))


# ---------------------------------------------------------------------------------------------
# Reading the cubin
# ---------------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\S+)*\s+.*?(0x[0-9a-f]+)")
_MMA = re.compile(r"^(?:@!?U?P\w+\s+)?(HMMA|HGMMA|IMMA|IGMMA|QGMMA|DMMA|BMMA|WGMMA)\b")
_FFMA = re.compile(r"^(?:@!?U?P\w+\s+)?(FFMA|DFMA)\b")


def _sass(cubin: bytes) -> List[Tuple[int, str]]:
    """(address, instruction) of every SASS instruction of the (single-kernel) cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(text)]


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count:\n{text}")
    return {k: int(v) for k, v in found.items()}


def loop_sass(instructions: Sequence[Tuple[int, str]], fma_dots: bool = False) -> int:
    """SASS instructions (NOPs excluded) in the tile loops: the innermost loops holding MMA
    instructions (with ``fma_dots``, IEEE fp32 dots on the FMA units: FFMA ones), summed; 0
    without such a loop. A loop is the span from a backward branch's target to the branch."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (_, ins) in enumerate(instructions):
        m = _BRANCH.match(ins)
        if m:
            target = index.get(int(m.group(1), 16))
            if target is not None and target < i:  # backward: a loop (a self-branch is the trap)
                loops.append((target, i))
    if not loops:
        return 0

    def holding(pattern):
        return [
            (a, b) for a, b in loops if any(pattern.match(i) for _, i in instructions[a : b + 1])
        ]

    candidates = holding(_FFMA if fma_dots else _MMA)
    if not candidates:
        return 0
    inner = [
        (a, b)
        for a, b in candidates
        if not any((c, d) != (a, b) and a <= c and d <= b for c, d in candidates)
    ]
    covered = set()
    for a, b in inner:
        covered.update(range(a, b + 1))
    return sum(1 for i in covered if not instructions[i][1].startswith("NOP"))


def record(launch: Launch, compiled, case: Case) -> dict:
    """The JSON record of one compiled launch."""
    cubin = compiled.asm["cubin"]
    res = _resources(cubin)
    import triton

    config = {k: v for k, v in launch.args.items() if k in _constexpr_names(launch)}
    config.update(
        {k: launch.options[k] for k in ("num_warps", "num_stages") if k in launch.options}
    )
    config.update(case.shape)
    config.update(target="sm_90", triton=triton.__version__)
    return {
        "kernel": kernel_name(launch.name),
        "variant": case.variant,
        "dtype": case.dtype,
        "config": config,
        "registers": res["REG"],
        "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
        "shared_bytes": int(compiled.metadata.shared),
        "loop_sass": loop_sass(_sass(cubin), fma_dots="ieee" in launch.args.values()),
    }


def kernel_name(fn_name: str) -> str:
    """The record's name of a kernel: ``_semantic_attention_fwd_kernel`` -> ``attention_fwd``."""
    name = fn_name.strip("_")
    name = name[: -len("_kernel")] if name.endswith("_kernel") else name
    return name.replace("semantic_attention", "attention")


def _constexpr_names(launch: Launch) -> List[str]:
    return [p.name for p in launch.fn.params if p.is_constexpr]


# ---------------------------------------------------------------------------------------------
# The cases: launchers called on meta tensors at the benchmark shapes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One call of a launcher: ``call()`` launches the kernels to compile."""

    family: str
    variant: str
    dtype: str
    shape: Dict[str, Any]
    call: Callable[[], Any]


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_META = torch.device("meta")


def _attention_cases(B, H, L, D, dtype, nb=32) -> List[Case]:
    from spnn_fast.kernels import attention as KA

    dt = _DTYPES[dtype]
    q, k, v, out, grad = (torch.empty(B, H, L, D, dtype=dt, device=_META) for _ in range(5))
    lse = torch.empty(B, H, L, dtype=torch.float32, device=_META)
    mask = torch.empty(B, L, dtype=torch.bool, device=_META)
    ts = torch.empty(B, L, dtype=torch.int64, device=_META)
    tb = torch.empty(H, nb, dtype=dt, device=_META)
    scale = D**-0.5
    shape = dict(B=B, H=H, L=L, D=D, NB=nb, causal=True)
    out_cases = []
    for variant, bias in (("full", True), ("no_bias", False)):
        t, b = (ts, tb) if bias else (None, None)
        fwd = lambda t=t, b=b: KA.semantic_attention_fwd(q, k, v, mask, t, b, True, scale)
        bwd = lambda t=t, b=b: KA.semantic_attention_bwd(
            grad, q, k, v, out, lse, mask, t, b, True, scale, b is not None
        )
        for part, call in (("fwd", fwd), ("bwd", bwd)):
            out_cases.append(Case(f"attention_{part}", variant, dtype, dict(shape), call))
    return out_cases


def _distill_cases(N, V, D, dtype, alphas=(0.0, 0.5), dt_width=None) -> List[Case]:
    from spnn_fast.kernels import distill as K

    dt = _DTYPES[dtype]
    dt_width = dt_width or D
    hs = torch.empty(N, D, dtype=dt, device=_META)
    ws = torch.empty(V, D, dtype=dt, device=_META)
    ht = torch.empty(N, dt_width, dtype=dt, device=_META)
    wt = torch.empty(V, dt_width, dtype=dt, device=_META)
    y = torch.empty(N, dtype=torch.int64, device=_META)
    stats = [torch.empty(N, dtype=torch.float32, device=_META) for _ in range(3)]
    g = torch.empty(N, dtype=torch.float32, device=_META)
    d_rows = torch.empty(N, D, dtype=torch.float32, device=_META)  # what the forward hands on
    out_cases = []
    for alpha in alphas:
        shape = dict(N=N, V=V, D=D, Dt=dt_width, alpha=alpha, temperature=2.0)
        args = (hs, ws, ht, wt, y)
        fwd = lambda args=args, a=alpha: K.distill_fwd(*args, 2.0, a, -100)
        bwd = lambda args=args, a=alpha: K.distill_bwd(
            g, *args, *stats, 2.0, a, -100, d_hidden_rows=d_rows
        )
        out_cases.append(Case("distill_fwd", "full", dtype, dict(shape), fwd))
        out_cases.append(Case("distill_bwd", "full", dtype, dict(shape), bwd))
    return out_cases


def _feature_cases(N, K_, dtype) -> List[Case]:
    from spnn_fast.kernels import feature_distill as K

    dt = _DTYPES[dtype]
    s, t = (torch.empty(N, K_, dtype=dt, device=_META) for _ in range(2))
    w, g = (torch.empty(N, dtype=torch.float32, device=_META) for _ in range(2))
    shape = dict(N=N, K=K_)
    return [
        Case(
            "feature_fwd", "full", dtype, dict(shape), lambda: K.feature_distill_fwd(s, t, w, 1e-5)
        ),
        Case(
            "feature_bwd",
            "full",
            dtype,
            dict(shape),
            lambda: K.feature_distill_bwd(g, s, t, w, 1e-5),
        ),
    ]


def _topk_cases(N, V, D, dtype, ks=(10, 100), exclude=True) -> List[Case]:
    from spnn_fast.kernels import topk as K

    dt = _DTYPES[dtype]
    h = torch.empty(N, D, dtype=dt, device=_META)
    w = torch.empty(V + 1, D, dtype=dt, device=_META)
    target = torch.empty(N, dtype=torch.int64, device=_META)
    offsets = torch.empty(N + 1, dtype=torch.int64, device=_META)
    ids = torch.empty(4 * N, dtype=torch.int64, device=_META)
    out_cases = []
    for k in ks:
        shape = dict(N=N, V=V, D=D, k=k, exclude=exclude)
        ex = (offsets, ids) if exclude else (None, None)
        call = lambda k=k, ex=ex: K.topk_fwd(h, w, k, *ex)
        out_cases.append(Case("topk_fwd", f"k={k}", dtype, shape, call))
    shape = dict(N=N, V=V, D=D)
    out_cases.append(
        Case("topk_rank", "full", dtype, shape, lambda: K.target_rank_fwd(h, w, target))
    )
    return out_cases


CASE_SETS = ("benchmark", "compile-check", "all")
FAMILIES = ("attention", "distill", "feature", "topk")


def cases(which: str = "benchmark", families: Optional[Sequence[str]] = None) -> List[Case]:
    """The launcher calls of a case set (:data:`CASE_SETS`), limited to the families given
    (:data:`FAMILIES`: prefixes of ``Case.family``)."""
    if which not in CASE_SETS:
        raise ValueError(f"unknown case set {which!r}; choose among {CASE_SETS}")
    unknown = [f for f in families or () if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose among {FAMILIES}")
    out: List[Case] = []
    if which in ("benchmark", "all"):
        out += _attention_cases(1024, 4, 200, 64, "bf16")
        out += _distill_cases(16384, 100_000, 64, "bf16")
        out += _feature_cases(16384, 64, "bf16")
        out += _topk_cases(4096, 1_000_000, 64, "bf16")
    if which in ("compile-check", "all"):
        for L, D, dtype, nb in ((50, 32, "bf16", 32), (512, 64, "bf16", 32), (200, 16, "bf16", 32),
                                (50, 128, "fp16", 64), (20, 16, "fp32", 32),
                                (200, 64, "fp32", 32)):  # fmt: skip
            out += _attention_cases(8, 2, L, D, dtype, nb=nb)
        out += _distill_cases(4096, 100_000, 256, "fp32", dt_width=256)
        out += _distill_cases(4096, 100_000, 256, "bf16", dt_width=256)
        out += _distill_cases(4096, 100_000, 64, "fp16", alphas=(0.5,), dt_width=128)
        out += _feature_cases(4096, 8192, "bf16")
        # the widest k and D, a small k, every dtype
        out += _topk_cases(512, 100_000, 64, "fp32", ks=(128,))
        out += _topk_cases(512, 100_000, 256, "fp32", ks=(128,), exclude=False)
        out += _topk_cases(512, 100_000, 256, "fp16", ks=(2,))
    if families:
        out = [c for c in out if c.family.split("_")[0] in families]
    return out


@contextlib.contextmanager
def _sm90_device():
    """Launchers size their grids from the card's multiprocessor count: give them an sm_90's.
    The attention launchers take the GPU form of the time bias on a device where its first-launch
    check passed: here, as on a card where it did."""
    from spnn_fast.kernels import _device
    from spnn_fast.kernels import attention as KA

    original = _device.multiprocessor_count, KA.bias_form_on
    _device.multiprocessor_count = lambda device: SM90_SMS
    KA.bias_form_on = lambda device: KA.fast_bias_form()
    try:
        yield
    finally:
        _device.multiprocessor_count, KA.bias_form_on = original


def run_cases(selected: Sequence[Case], log=None) -> List[dict]:
    """Compile the launches of every case; one record per distinct kernel launch and case."""
    records = []
    for case in selected:
        with _sm90_device(), capture() as launches:
            case.call()
        if not launches:
            raise RuntimeError(f"{case.family} {case.variant}: the launcher launched nothing")
        seen = set()
        for launch in launches:
            sig = specialize(launch)
            key = (launch.name, repr(sig), repr(sorted(launch.options.items())))
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            rec = record(launch, compile_launch(launch), case)
            records.append(rec)
            if log:
                log(f"{_row(rec)}  ({time.perf_counter() - t0:.1f} s)")
    return records


RECORD_KEYS = (
    "kernel", "variant", "dtype", "config", "registers", "spill_bytes", "shared_bytes", "loop_sass"
)  # fmt: skip
# The offline goals: the attention's tile loop with the time bias (and, in the backward, its
# gradient) at most this many times the one without; at most this many passes over the logits
# per call of the distillation loss (a kernel with a tile loop over them is one pass).
BIAS_RATIO_LIMITS = {"attention_fwd": 1.5, "attention_bwd": 1.8}
LOGIT_PASSES_LIMIT = 2


def check_records(records: Sequence[dict]) -> None:
    """Raise ValueError unless every record has the documented keys and types."""
    types = dict(kernel=str, variant=str, dtype=str, config=dict, registers=int,
                 spill_bytes=int, shared_bytes=int, loop_sass=int)  # fmt: skip
    for rec in records:
        if tuple(rec) != RECORD_KEYS:
            raise ValueError(f"record keys {tuple(rec)} != {RECORD_KEYS}")
        for key, kind in types.items():
            if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
                raise ValueError(f"{rec['kernel']}: {key} = {rec[key]!r} is not {kind.__name__}")


def goals(records: Sequence[dict]) -> List[Tuple[str, float, float, bool]]:
    """The offline goals on benchmark records: ``(goal, value, limit, held)`` for no spills (in
    bytes), each attention bias ratio and the logit passes of each distillation ``alpha``."""
    out = []
    spills = max((r["spill_bytes"] for r in records), default=0)
    out.append(("spill bytes (any kernel)", spills, 0, spills == 0))
    loops = {(r["kernel"], r["variant"]): r["loop_sass"] for r in records}
    for kernel, limit in BIAS_RATIO_LIMITS.items():
        full, plain = loops.get((kernel, "full")), loops.get((kernel, "no_bias"))
        if full is None or not plain:
            raise ValueError(f"no {kernel} full and no_bias records to compare")
        ratio = full / plain
        out.append((f"{kernel} loop_sass full / no_bias", round(ratio, 3), limit, ratio <= limit))
    alphas = sorted({r["config"]["alpha"] for r in records if r["kernel"].startswith("distill")})
    for alpha in alphas:
        passes = sum(
            1
            for r in records
            if r["kernel"].startswith("distill") and r["config"]["alpha"] == alpha
            and r["loop_sass"] > 0
        )  # fmt: skip
        out.append((f"distill alpha={alpha:g} passes over the logits", passes,
                    LOGIT_PASSES_LIMIT, passes <= LOGIT_PASSES_LIMIT))  # fmt: skip
    return out


def _row(rec: dict) -> str:
    alpha = rec["config"].get("alpha")
    variant = rec["variant"] + (f" a={alpha:g}" if alpha is not None else "")
    return (
        f"{rec['kernel']:<28} {variant:<12} {rec['dtype']:<5} reg {rec['registers']:>3}  "
        f"spill {rec['spill_bytes']:>4}  smem {rec['shared_bytes']:>6}  loop {rec['loop_sass']:>5}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--cases", default="benchmark", choices=CASE_SETS)
    parser.add_argument(
        "--family",
        default="",
        help="comma list among attention, distill, feature, topk (default all)",
    )
    args = parser.parse_args(argv)
    reason = compile_unavailable_reason()
    if reason:
        print(f"kernel_stats: {reason}", file=sys.stderr)
        return 2
    selected = cases(args.cases, [f for f in args.family.split(",") if f])
    records = run_cases(selected, log=print)
    check_records(records)
    if args.cases == "benchmark" and not args.family:
        for goal, value, limit, held in goals(records):
            print(f"{'held' if held else 'MISSED':<7} {goal}: {value} (limit {limit})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
