"""The headline GPU comparisons of the fused kernels against what a user would otherwise pick.

    python benchmarks/gpu_quick.py --out DIR [--set headline|more|all] [--budget-s S] [--dry-run]

bf16, fp32 accumulation; each time is the median of a warm ``triton.testing.do_bench`` and every
baseline runs in the same process on the same inputs (built by ``bench_attention.py`` and
``bench_distill.py``, whose baselines this reuses). The headline set, in this order:

* semantic attention (padding mask + causal + time bias and its gradient), B=1024, H=4, L=200,
  D=64, forward + backward, then forward: against ``sdpa_float_mask`` (SDPA with the mask and
  the bias as one additive float mask), ``sdpa_flash_causal_nobias`` (SDPA's flash backend with
  causality alone: the ceiling a bias-free kernel sets) and, forward + backward,
  ``flex_compiled`` (compiled FlexAttention, the bias as a ``score_mod``, padding and causality
  as a block mask built outside the timed region);
* the distillation loss, N=16384, V=10^5, D=64, forward + backward, alpha 0 and 0.5: against
  ``naive_eager`` and ``naive_compiled`` (``torch.compile`` of the naive loss) and, at alpha 0
  where the installed torch has it, PyTorch's own ``linear_cross_entropy`` (``torch_lce``: its
  reference path; ``torch_lce_chunked``: its chunked path);
* attention at L=50, D=32 and L=512, D=64 against the two SDPA baselines.

The ``more`` set adds FlexAttention's forward and the other lengths, the fused top-k over
10^6 items against ``torch.topk`` of the full scores (``naive_eager``, ``naive_compiled``), and
V=10^6 (a baseline that
runs out of memory is reported as skipped). Each result is appended to ``DIR/quick.jsonl`` as it finishes
(with the peak extra memory of one call, and whether the baseline's forward matched ours), and
``DIR/quick.json`` is rewritten after each one::

    {"card": str, "comparisons": [{"op", "shape", "mode", "ours_ms", "baseline", "baseline_ms"}],
     "skipped": [{"op", "shape", "mode", "baseline", "reason"}]}

so a run stopped by a time limit keeps what it measured; a later run into the same folder on the
same card adds to them (start from an empty folder for a fresh summary). On a GPU the summary is
also written to ``benchmarks/results/gpu_<card>/quick.json``. No new comparison starts after ``--budget-s``
seconds. ``--dry-run`` runs the same code on the CPU at tiny sizes with the PyTorch path as
"ours" and the eager baselines only, timed with a plain clock: it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from spnn_fast import backends

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ATTENTION_BASELINES = ("sdpa_float_mask", "flex_compiled", "sdpa_flash_causal_nobias")
DISTILL_BASELINES = ("naive_eager", "naive_compiled", "torch_lce", "torch_lce_chunked")
TOPK_BASELINES = ("naive_eager", "naive_compiled")


def bias_form(dev: torch.device) -> dict:
    """Which form of the attention's time bias the kernels take on ``dev`` (the first launch's
    check of the GPU form against the portable one), and why."""
    if not backends.status()["triton_installed"]:
        return {"form": None, "why": "Triton is not installed"}
    if dev.type != "cuda":
        return {"form": "portable", "why": f"no GPU form on {dev.type} (interpreted, if at all)"}
    from spnn_fast.kernels import attention as KA

    return KA.bias_form_report(dev)


def card_slug(card: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``: the folder name of a card's results."""
    name = re.sub(r"(?i)\bnvidia\b", "", card)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


class Recorder:
    """Appends each result to ``quick.jsonl`` and rewrites the ``quick.json`` summary(s),
    keeping what an earlier run on the same card wrote into that folder."""

    def __init__(
        self, out_dir: Path, card: str, mirror: Optional[Path] = None,
        bias_form: Optional[dict] = None,
    ) -> None:  # fmt: skip
        self.card = card
        self.bias_form = bias_form
        self.paths = [out_dir / "quick.json"] + ([mirror / "quick.json"] if mirror else [])
        self.jsonl = out_dir / "quick.jsonl"
        self.comparisons: List[dict] = []
        self.skipped: List[dict] = []
        # A later set of the same run (same card) adds to the summary an earlier one wrote.
        if self.paths[0].exists():
            earlier = json.loads(self.paths[0].read_text())
            if earlier.get("card") == card:
                self.comparisons = earlier.get("comparisons", [])
                self.skipped = earlier.get("skipped", [])
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def add(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"card": self.card, **row}) + "\n")
        keys = ("op", "shape", "mode", "ours_ms", "baseline", "baseline_ms")
        if row.get("baseline_ms") is not None:
            self.comparisons.append({k: row[k] for k in keys})
            ratio = row["baseline_ms"] / row["ours_ms"]
            print(f"{row['op']} {row['mode']} {row['shape']}: ours {row['ours_ms']:.3f} ms, "
                  f"{row['baseline']} {row['baseline_ms']:.3f} ms (baseline / ours "
                  f"{ratio:.2f}x) on {self.card}", flush=True)  # fmt: skip
        else:
            skip = {k: row[k] for k in ("op", "shape", "mode", "baseline")}
            self.skipped.append({**skip, "reason": row.get("reason", "")})
            print(f"{row['op']} {row['mode']} {row['shape']}: {row['baseline']} skipped: "
                  f"{row.get('reason', '')}", flush=True)  # fmt: skip
        self._write()

    def _write(self) -> None:
        summary = {"card": self.card, "bias_form": self.bias_form,
                   "comparisons": self.comparisons, "skipped": self.skipped}  # fmt: skip
        for path in self.paths:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
            os.replace(tmp, path)  # a reader never sees half a file


def _bench_gpu(fn: Callable[[], object], grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=150, grad_to_none=grad_to_none, return_mode="median"))


def _bench_cpu(fn: Callable[[], object], grad_to_none=None) -> float:
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], object], dev: torch.device) -> Optional[int]:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return int(torch.cuda.max_memory_allocated() - base)


class Session:
    """Shared state of one run: device, timer, recorder, budget, which baselines can run."""

    def __init__(self, rec: Recorder, dev: torch.device, budget_s: float, dry_run: bool) -> None:
        self.rec, self.dev, self.dry_run = rec, dev, dry_run
        self.deadline = time.time() + budget_s
        self.bench = _bench_cpu if dry_run else _bench_gpu

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def compare(self, op: str, shape: dict, mode: str, ours: Callable, baselines: Dict,
                same: Callable[[object, object], bool], grads=None,
                unrelated: tuple = ()) -> None:  # fmt: skip
        """Time ``ours`` and each ``baselines[name]`` (a callable, or a string: why it cannot
        run here), in order; record one row per baseline. ``same(baseline_out, ours_out)``
        says whether a baseline computed what ours did (not asked of the ``unrelated`` ones,
        such as a ceiling without the bias)."""
        if self.out_of_time():
            print(f"budget spent: {op} {mode} {shape} not measured", flush=True)
            return
        ref = ours()  # compiles what needs compiling
        ours_ms = self.bench(ours, grads)
        ours_peak = _peak_bytes(ours, self.dev)
        for name, fn in baselines.items():
            row = dict(op=op, shape=shape, mode=mode, ours_ms=ours_ms, baseline=name)
            row.update(ours_peak_bytes=ours_peak, dtype=_dtype_name(self.dev))
            if isinstance(fn, str):
                self.rec.add({**row, "baseline_ms": None, "reason": fn})
                continue
            if self.out_of_time():
                self.rec.add({**row, "baseline_ms": None, "reason": "time budget spent"})
                continue
            try:
                got = fn()
                row["matches_ours"] = None if name in unrelated else bool(same(got, ref))
                del got
                row["baseline_ms"] = self.bench(fn, grads)
                row["baseline_peak_bytes"] = _peak_bytes(fn, self.dev)
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                self.rec.add({**row, "baseline_ms": None, "reason": reason})
                continue
            self.rec.add(row)


def _dtype_name(dev: torch.device) -> str:
    return "bfloat16" if dev.type == "cuda" else "float32"


# ---------------------------------------------------------------------------------------------
# Semantic attention
# ---------------------------------------------------------------------------------------------


def _attention(
    s: Session, B: int, H: int, L: int, D: int, modes=("fwd+bwd", "fwd"), flex_modes=()
) -> None:
    """One shape in each of ``modes``; FlexAttention (a compile per shape and grad mode) only
    in ``flex_modes``."""
    import bench_attention as BA
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spnn_fast.reference.attention_baselines import flex_unavailable_reason

    inputs = BA._inputs((B, H, L, D))
    ours_impl = "spnn_fast[torch]" if s.dry_run else "spnn_fast[triton]"
    names = {"ours": ours_impl, "sdpa_float_mask": "sdpa", "flex_compiled": "flex"}
    leaves = {n: inputs[n].detach().requires_grad_(True) for n in ("q", "k", "v", "time_bias")}
    grad_out = torch.randn_like(inputs["q"])
    shape = dict(B=B, H=H, L=L, D=D, NB=BA.NB)

    def flash(**kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True)

    def runner(fn, mode):
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return fn(**inputs)

            return run
        args = {**inputs, **leaves}
        wanted = [leaves[n] for n in ("q", "k", "v")]
        if fn is not flash:
            wanted.append(leaves["time_bias"])

        def run():
            out = fn(**args)
            return (out, *torch.autograd.grad(out, wanted, grad_out))

        return run

    def same(got, ref):
        a = got if torch.is_tensor(got) else got[0]
        b = ref if torch.is_tensor(ref) else ref[0]
        return bool(torch.allclose(a.float(), b.float(), atol=6e-2, rtol=6e-2))

    for mode in modes:
        ours = runner(BA._callable(names["ours"], inputs), mode)
        # Cheap baselines first: a time limit that stops a compile loses that one only.
        baselines = {
            "sdpa_float_mask": runner(BA._callable("sdpa", inputs), mode),
            "sdpa_flash_causal_nobias": runner(flash, mode),
        }
        reason = flex_unavailable_reason(s.dev, backward=mode == "fwd+bwd")
        if mode not in flex_modes:
            reason = f"FlexAttention ({mode}) is compiled at other shapes in this set"
        elif s.dry_run:
            reason = "a dry run skips compiled baselines"
        baselines["flex_compiled"] = reason or runner(BA._callable("flex", inputs), mode)
        s.compare("attention", shape, mode, ours, baselines, same, list(leaves.values()),
                  unrelated=("sdpa_flash_causal_nobias",))  # fmt: skip
        if s.out_of_time():
            return


# ---------------------------------------------------------------------------------------------
# Distillation loss
# ---------------------------------------------------------------------------------------------


def _distill(s: Session, n: int, v: int, alpha: float) -> None:
    import bench_distill as BD

    dtype = torch.bfloat16 if s.dev.type == "cuda" else torch.float32
    hs, ws, ht, wt, y = BD._inputs(n, v, dtype, s.dev)
    shape = dict(N=n, V=v, D=BD.D, alpha=alpha)

    def step(fn):
        def run():
            loss = fn(hs, ws, ht, wt, y)
            loss.backward()
            return loss.detach()

        return run

    ours_fn = BD._loss_fn("spnn_fast", alpha, dtype)
    if s.dry_run:
        ours_fn = lambda *a: BD.SF.distillation_loss(  # noqa: E731
            *a, temperature=2.0, alpha=alpha, backend="torch"
        )
    baselines = {"naive_eager": step(BD._loss_fn("naive_eager", alpha, dtype))}
    baselines["naive_compiled"] = (
        "a dry run skips compiled baselines"
        if s.dry_run
        else step(BD._loss_fn("naive_compiled", alpha, dtype))
    )
    for name in ("torch_lce", "torch_lce_chunked"):  # PyTorch's own, where it has one
        reason = BD._skip_reason(name, n, v, alpha, dtype, torch.device("cuda"))
        baselines[name] = reason or step(BD._loss_fn(name, alpha, dtype))
    same = lambda got, ref: bool(torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2))  # noqa: E731
    s.compare("distill", shape, "fwd+bwd", step(ours_fn), baselines, same, [hs, ws])


def _topk(s: Session, n: int, v: int, k: int) -> None:
    """Top-k over the catalogue: the fused op against ``torch.topk(h @ W.T)``, eager and
    compiled (the naive ones form the [N, V] scores)."""
    from spnn_fast.functional import topk_scores
    from spnn_fast.reference.topk import topk_scores_naive

    dtype = torch.bfloat16 if s.dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, 64, generator=g).to(s.dev, dtype)
    w = (torch.randn(v + 1, 64, generator=g) / 8).to(s.dev, dtype)
    backend = "torch" if s.dry_run else "triton"
    ours = lambda: topk_scores(h, w, k, backend=backend)  # noqa: E731
    naive = lambda: topk_scores_naive(h, w, k)  # noqa: E731
    compiled = torch.compile(topk_scores_naive) if not s.dry_run else None
    baselines = {
        "naive_eager": naive,
        "naive_compiled": (lambda: compiled(h, w, k))
        if compiled
        else "a dry run skips compiled baselines",
    }
    # The same item scores (ties may come in another order): compare the values.
    same = lambda got, ref: bool(  # noqa: E731
        torch.allclose(got[0].float(), ref[0].float(), rtol=1e-2, atol=1e-2)
    )
    s.compare("topk", dict(N=n, V=v, k=k, D=64), "fwd", ours, baselines, same)


# ---------------------------------------------------------------------------------------------


def run(set_name: str, s: Session) -> int:
    """The comparisons of a set, in order; returns how many groups failed (each is reported)."""
    tiny = s.dry_run
    att = (2, 2, 16, 16) if tiny else (1024, 4, 200, 64)
    others = [(2, 2, 8, 32), (2, 2, 32, 16)] if tiny else [(1024, 4, 50, 32), (1024, 4, 512, 64)]
    dist = (64, 500) if tiny else (16384, 100_000)
    big = (64, 5000) if tiny else (16384, 1_000_000)
    groups = []
    if set_name in ("headline", "all"):
        groups.append(lambda: _attention(s, *att, flex_modes=("fwd+bwd",)))
        groups += [lambda a=a: _distill(s, *dist, a) for a in (0.0, 0.5)]
        groups += [lambda c=c: _attention(s, *c) for c in others]
    if set_name in ("more", "all"):
        groups.append(lambda: _attention(s, *att, modes=("fwd",), flex_modes=("fwd",)))
        groups += [
            lambda c=c: _attention(s, *c, modes=("fwd+bwd",), flex_modes=("fwd+bwd",))
            for c in others
        ]
        topk = (64, 5000) if tiny else (4096, 1_000_000)
        groups += [lambda kk=kk: _topk(s, *topk, kk) for kk in (10, 100)]
        groups += [lambda a=a: _distill(s, *big, a) for a in (0.0, 0.5)]
    failed = 0
    for group in groups:
        try:
            group()
        except Exception as e:  # our own path failed: say so, go on with the next group
            failed += 1
            print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if s.dev.type == "cuda":
                torch.cuda.empty_cache()
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for quick.json and quick.jsonl")
    p.add_argument("--set", default="headline", choices=("headline", "more", "all"))
    p.add_argument("--budget-s", type=float, default=110.0, help="no new comparison after this")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, torch path")
    args = p.parse_args(argv)
    if args.dry_run:
        dev, card, mirror = torch.device("cpu"), "cpu (dry run)", None
    elif torch.cuda.is_available():
        dev, card = torch.device("cuda"), torch.cuda.get_device_name()
        mirror = HERE / "results" / f"gpu_{card_slug(card)}"
    else:
        print("gpu_quick.py needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, card, mirror, bias_form(dev))
    return 1 if run(args.set, Session(rec, dev, args.budget_s, args.dry_run)) else 0


if __name__ == "__main__":
    sys.exit(main())
