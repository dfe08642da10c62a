"""Command line: ``spnn-fast train`` (the main job), ``spnn-fast eval CHECKPOINT``, ``spnn-fast info``.

Also runs as ``python -m spnn_fast ...`` and under ``torchrun --nproc_per_node=N -m spnn_fast
train ...`` (DistributedDataParallel: gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import sys
from typing import List, Optional

__all__ = ["main"]


# train flags that apply to a resumed run too (the others come from its run.json)
_RESUME_FLAGS = ("resume", "threads", "dist_timeout", "teacher_cache_mb")


def _train_parser(sub) -> argparse.ArgumentParser:
    from spnn_fast.experiment import ExperimentConfig
    from spnn_fast.train import TEACHER_INPUTS

    d = ExperimentConfig()
    p = sub.add_parser("train", help="train teacher, student and distilled student; write a report")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help=f"a known data set name (default {d.dataset})")
    src.add_argument("--data", default=None, help="path to a RecBole .inter, ratings.dat or CSV")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--teacher-max-len", type=int, default=d.teacher_max_len,
                   help="events the teacher sees (default: --max-len)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=("constant", "cosine"), default=d.schedule,
                   help="learning rate: constant, or warmup + cosine decay over --epochs")  # fmt: skip
    p.add_argument("--dropout", type=float, default=d.dropout,
                   help="the students' dropout (and the teacher's with --teacher-dropout -1)")  # fmt: skip
    p.add_argument("--teacher-dropout", type=float, default=d.teacher_dropout,
                   help="the teacher's dropout; -1: the same as --dropout")  # fmt: skip
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--window-stride", type=int, default=d.window_stride,
                   help="a training window ends every N events; each target of an uncut window "
                        "is trained once, after at least max-len - N earlier events (0: windows "
                        "that do not overlap)")  # fmt: skip
    p.add_argument("--teacher-d", type=int, default=d.teacher_d)
    p.add_argument("--teacher-layers", type=int, default=d.teacher_layers)
    p.add_argument("--teacher-cut-prob", type=float, default=d.teacher_cut_prob,
                   help="share of the teacher's windows cut short, as augmentation")  # fmt: skip
    p.add_argument("--student-d", type=int, default=d.student_d)
    p.add_argument("--student-layers", type=int, default=d.student_layers)
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of logit KD vs CE")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--feature-weight", type=float, default=d.feature_weight)
    p.add_argument("--kd-teacher-input", choices=TEACHER_INPUTS, default=d.kd_teacher_input,
                   help="what student_kd's teacher reads: its full window (privileged) or the "
                        "student's own, possibly cut, input")  # fmt: skip
    p.add_argument("--teacher-cache-mb", type=float, default=d.teacher_cache_mb,
                   help="student_kd keeps its teacher's outputs on every window when they fit in "
                        "this many MiB (0: the teacher runs on every batch; same results)")  # fmt: skip
    p.add_argument("--no-side-features", action="store_true")
    p.add_argument("--backend", default=None, help="auto, triton or torch (attention and losses)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others before failing")  # fmt: skip
    return p


def _settings_given(parser: argparse.ArgumentParser, args) -> List[str]:
    """The flags of ``parser`` that ``args`` sets away from their defaults, but for those that
    apply to a resumed run too."""
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.dest not in (*_RESUME_FLAGS, "help")
            and getattr(args, a.dest) != a.default]  # fmt: skip


def _config_from_args(args):
    from spnn_fast.experiment import ExperimentConfig

    return ExperimentConfig(
        dataset=args.data or args.dataset or ExperimentConfig.dataset,
        seeds=args.seeds, epochs=args.epochs, device=args.device, max_len=args.max_len,
        teacher_max_len=args.teacher_max_len,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, dropout=args.dropout,
        teacher_dropout=None if args.teacher_dropout == -1 else args.teacher_dropout,
        patience=args.patience, window_stride=args.window_stride or None,
        teacher_d=args.teacher_d, teacher_layers=args.teacher_layers,
        teacher_cut_prob=args.teacher_cut_prob,
        student_d=args.student_d, student_layers=args.student_layers,
        alpha=args.alpha, temperature=args.temperature, feature_weight=args.feature_weight,
        kd_teacher_input=args.kd_teacher_input, teacher_cache_mb=args.teacher_cache_mb,
        use_side_features=not args.no_side_features, backend=args.backend,
    )  # fmt: skip


def _init_distributed(device: str, timeout: float) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def _cmd_train(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from spnn_fast.experiment import ExperimentConfig, run

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.resume:
        ignored = _settings_given(parser, args)
        if ignored:
            raise ValueError(
                f"--resume {args.resume} continues the run with the settings in its run.json; "
                f"{', '.join(ignored)} would be ignored (to add seeds: --out {args.resume} "
                f"--seeds N with the run's settings)"
            )
        run_json = os.path.join(args.resume, "run.json")
        if not os.path.exists(run_json):
            raise SystemExit(f"spnn-fast: --resume {args.resume}: no run.json there")
        with open(run_json) as f:
            saved = json.load(f)["config"]
        cfg = ExperimentConfig.from_saved({**saved, "teacher_cache_mb": args.teacher_cache_mb})
        out = args.resume
    else:
        cfg = _config_from_args(args)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or os.path.join("runs", stamp)
    distributed = _init_distributed(cfg.device, args.dist_timeout)
    if distributed:
        import torch.distributed as dist

        if cfg.device.startswith("cuda"):
            cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        log = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    else:
        log = print
    try:
        from spnn_fast.report import markdown

        report = run(cfg, out, log=log)
        log(markdown(report))
        log(f"report: {os.path.join(out, 'report.md')}")
        if distributed:
            # Every rank done, and the trainers' DDP objects (which hold the process group)
            # collected, before any rank tears it down: a gloo process group destroyed while a
            # peer still uses it, or left for interpreter shutdown, can abort the process.
            gc.collect()
            dist.barrier()
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _cmd_eval(args) -> int:
    from spnn_fast.experiment import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.device, args.dataset)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    keys = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")
    print("| split | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for split, m in metrics.items():
        print(f"| {split} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    return 0


def _cmd_info(args) -> int:
    import spnn_fast

    print(json.dumps({"version": spnn_fast.__version__, **spnn_fast.backends.status()}, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="spnn-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _train_parser(sub)
    pe = sub.add_parser("eval", help="evaluate a saved model (best.pt) on every split")
    pe.add_argument("checkpoint")
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--dataset", default=None, help="override the data set stored in it")
    pe.add_argument("--json", action="store_true")
    sub.add_parser("info", help="print what runs here (backends)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args, train_parser)
        return {"eval": _cmd_eval, "info": _cmd_info}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"spnn-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
