"""Sweep the launch parameters of the Triton kernels on a GPU; one JSON line per candidate.

The kernels pick their tiles with fixed rules (``kernels.attention.fwd_config``, ``bwd_config``
and ``BUCKET_WINDOW``; ``kernels.distill.fwd_config`` and ``items_config``). This script times
other candidates on the benchmark's shapes, so that a change of those rules rests on
measurements. Each candidate is first checked against the
result of the current rule (a candidate that computes something else is reported, not timed),
then timed with ``triton.testing.do_bench`` (median ms). The current rule is always the first
line of its sweep, marked ``"current": true``.

    python benchmarks/tune_gpu.py --out tune.jsonl [--budget-s 60] [--only distill,attention]

CUDA only. ``--budget-s`` stops starting new candidates of a part after that many seconds (the
lines written so far stand).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
import time

import torch

ATTENTION_SHAPES = [(1024, 4, 200, 64), (256, 2, 50, 32)]  # (B, H, L, D), as bench_attention.py
DISTILL_SHAPE = (16384, 100_000, 64)  # (N, V, D), as bench_distill.py


def _attention_inputs(B, H, L, D, dtype, dev):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(dev, dtype) for _ in range(4))
    lengths = torch.randint(max(1, L // 4), L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(dev)
    gaps = (torch.rand(B, L, generator=g, dtype=torch.float64) * 1e6).to(torch.int64)
    ts = (torch.cumsum(gaps, dim=1) + 1_700_000_000).to(dev)
    tb = (0.5 * torch.randn(H, 32, generator=g)).to(dev, dtype)
    return q, k, v, do, mask, ts, tb


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _close(a, b, tol):
    return all(torch.allclose(x.float(), y.float(), atol=tol, rtol=tol) for x, y in zip(a, b))


def _measure(emit, row, patches, trial, warmup, rep):
    """Run one candidate and emit its row. Under ``patches`` ((module, name, value) triples),
    ``trial()`` returns ``(matches_current, {field: fn})``; each fn is timed (median ms) only
    when the candidate matches. A candidate that does not compile (shared memory, registers)
    gets its error in the row instead."""
    from triton.testing import do_bench

    try:
        with contextlib.ExitStack() as stack:
            for module, name, value in patches:
                stack.enter_context(_patched(module, name, value))
            ok, timed = trial()
            row["matches_current"] = ok
            if ok:
                for field, fn in timed.items():
                    row[field] = do_bench(fn, warmup=warmup, rep=rep)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    emit(row)


def sweep_attention(emit, deadline, dev):
    from spnn_fast.kernels import attention as KA

    dtype = torch.bfloat16
    fwd_cands = [
        dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((64, 128), (32, 64), (4, 8), (2, 3))
        if n <= m
    ]
    bwd_cands = [
        dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2))
        if m <= n
    ]
    for B, H, L, D in ATTENTION_SHAPES:
        q, k, v, do, mask, ts, tb = _attention_inputs(B, H, L, D, dtype, dev)
        scale = D**-0.5
        fwd = functools.partial(KA.semantic_attention_fwd, q, k, v, mask, ts, tb, True, scale)
        ref_out, ref_lse = fwd()
        bwd = functools.partial(KA.semantic_attention_bwd, do, q, k, v, ref_out, ref_lse, mask, ts,
                                tb, True, scale, True)  # fmt: skip
        ref_grads = bwd()
        current = (KA.fwd_config(L, D, dtype), KA.bwd_config(L, D, dtype))
        shape = dict(B=B, H=H, L=L, D=D, dtype="bfloat16")
        for kind, cands, run, ref, cur in (
            ("attention_fwd", fwd_cands, fwd, (ref_out,), current[0]),
            ("attention_bwd", bwd_cands, bwd, ref_grads, current[1]),
        ):
            name = "fwd_config" if kind == "attention_fwd" else "bwd_config"
            for cfg in [cur] + [c for c in cands if c != cur]:
                if time.time() > deadline:
                    return
                row = dict(kernel=kind, **shape, config=cfg, current=cfg is cur)

                def trial(run=run, ref=ref, kind=kind):
                    got = run()
                    got = got[:1] if kind == "attention_fwd" else got
                    return _close(got, ref, 2e-2), {"ms": run}

                patch = (KA, name, lambda L, D, dtype=None, c=cfg: dict(c))
                _measure(emit, row, [patch], trial, warmup=10, rep=40)
        # The bias-gradient histogram's buckets per pass.
        for window in dict.fromkeys((KA.BUCKET_WINDOW, 1, 2, 4)):
            if time.time() > deadline:
                return
            row = dict(kernel="attention_bwd", **shape, bucket_window=window,
                       current=window == KA.BUCKET_WINDOW)  # fmt: skip

            def trial(bwd=bwd, ref_grads=ref_grads):
                return _close(bwd(), ref_grads, 2e-2), {"ms": bwd}

            _measure(emit, row, [(KA, "BUCKET_WINDOW", window)], trial, warmup=10, rep=40)


def sweep_distill(emit, deadline, dev):
    from spnn_fast.kernels import distill as KD

    dtype = torch.bfloat16
    n, v, d = DISTILL_SHAPE
    g = torch.Generator().manual_seed(0)
    hs, ht = (torch.randn(n, d, generator=g).to(dev, dtype) for _ in range(2))
    ws, wt = ((0.1 * torch.randn(v, d, generator=g)).to(dev, dtype) for _ in range(2))
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    grad_rows = torch.full((n,), 1.0 / n, device=dev)
    fwd_cands = [
        dict(BLOCK_N=bn, BLOCK_V=bv, num_warps=w, num_stages=st)
        for bn, bv, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    ]
    items_cands = [
        dict(BLOCK_N=bn, BLOCK_V=bv, num_warps=w, num_stages=st)
        for bn, bv, w, st in itertools.product((16, 32, 64), (64, 128), (4, 8), (2,))
    ]
    for alpha in (0.0, 0.5):
        args = (hs, ws, ht, wt, y, 2.0, alpha, -100)
        ref_fwd = KD.distill_fwd(*args)
        ref_grads = KD.distill_bwd(grad_rows, hs, ws, ht, wt, y, *ref_fwd[1:4], 2.0, alpha, -100,
                                   d_hidden_rows=ref_fwd[4])  # fmt: skip
        bd = KD._block_d(d)
        shape = dict(N=n, V=v, D=d, alpha=alpha, dtype="bfloat16")
        cur_fwd = KD.fwd_config(bd, bd, alpha < 1, alpha > 0, hs.element_size())
        for cfg in [cur_fwd] + [c for c in fwd_cands if c != cur_fwd]:
            if time.time() > deadline:
                return
            row = dict(kernel="distill_fwd", **shape, config=cfg, current=cfg == cur_fwd)

            def trial(args=args, ref_fwd=ref_fwd):
                fwd = functools.partial(KD.distill_fwd, *args)
                return _close(fwd(), ref_fwd, 1e-3), {"fwd_ms": fwd}

            _measure(emit, row, [(KD, "fwd_config", lambda *a, c=cfg: dict(c))], trial, 5, 30)
        cur_items = KD.items_config(bd, bd, alpha > 0, hs.element_size())
        for cfg in [cur_items] + [c for c in items_cands if c != cur_items]:
            if time.time() > deadline:
                return
            row = dict(kernel="distill_bwd_items", **shape, config=cfg,
                       current=cfg == cur_items)  # fmt: skip
            bwd = functools.partial(KD.distill_bwd, grad_rows, hs, ws, ht, wt, y, *ref_fwd[1:4],
                                    2.0, alpha, -100, d_hidden_rows=ref_fwd[4])  # fmt: skip

            def trial(bwd=bwd, ref_grads=ref_grads):
                return _close(bwd(), ref_grads, 2e-2), {"bwd_ms": bwd}

            _measure(emit, row, [(KD, "items_config", lambda *a, c=cfg: dict(c))], trial, 5, 30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON lines file (appended)")
    p.add_argument("--budget-s", type=float, default=60.0, help="seconds per part")
    p.add_argument("--only", default="distill,attention")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    with open(args.out, "a") as f:

        def emit(row):
            row["device"] = torch.cuda.get_device_name()
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)

        for part in args.only.split(","):  # each part has its own budget
            deadline = time.time() + args.budget_s
            {"attention": sweep_attention, "distill": sweep_distill}[part](emit, deadline, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
