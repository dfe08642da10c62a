"""Command line: ``spnn-fast train`` (the main job), ``spnn-fast eval CHECKPOINT``,
``spnn-fast recommend RUN_OR_CHECKPOINT``, ``spnn-fast distill RUN``, ``spnn-fast info``.

Also runs as ``python -m spnn_fast ...`` and under ``torchrun --nproc_per_node=N -m spnn_fast
train ...`` (DistributedDataParallel: gloo on the CPU, nccl on CUDA). The flags of ``train`` are
the fields of :class:`spnn_fast.config.ExperimentConfig`, generated from it; the others
(``--out``, ``--resume``, ``--wait``, ``--allow-changed-data``, ...) say how to run, and are not
settings of the run (run.json keeps ``--threads`` beside them: a resumed run uses it again). An error a user can act on (a setting, the data, a damaged or busy run folder, the file
system) is one line on stderr and exit status 2; Ctrl-C is one line (for ``train`` and
``distill``, how to go on) and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import gc
import json
import logging
import os
import sys
import typing
from typing import Dict, List, Optional, Tuple

__all__ = ["main"]

# Flags of the train command that are not settings of the run (not in run.json's "config").
_RUN_OPTIONS = ("out", "resume", "threads", "dist_timeout", "wait", "allow_changed_data")


_METAVARS = {int: "N", float: "X", str: "NAME"}


def _parse_optional(kind):
    """argparse ``type`` for an ``Optional[kind]`` field: the word None, or a ``kind``."""

    def parse(text: str):
        return None if text == "None" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of ExperimentConfig: ``--max-len`` for ``max_len``, its help text and
    choices from the field, its default shown; a flag not given is left out of the namespace."""
    from spnn_fast.config import ExperimentConfig

    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        kind, meta = hints[f.name], f.metadata
        names = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kw = dict(dest=f.name, default=argparse.SUPPRESS,
                  help=f"{meta['help']} (default: {f.default})")  # fmt: skip
        if kind is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        args = typing.get_args(kind)
        if type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            kw.update(type=_parse_optional(inner), metavar=_METAVARS[inner] + "|None")
        else:
            kw.update(type=kind, metavar=_METAVARS[kind])
        if "choices" in meta:
            kw.update(choices=meta["choices"], metavar=None)
        p.add_argument(*names, **kw)


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train teacher, student and distilled student; write a report",
        description="Train a teacher, a student and a distilled student per seed and write a "
                    "report. Every setting flag takes its default from ExperimentConfig.",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR with the settings saved in its run.json")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch's and MKL's; default: those of the run it goes on "
                        "with, kept in run.json, else torch's)")  # fmt: skip
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others before failing")  # fmt: skip
    p.add_argument("--wait", action="store_true",
                   help="when another process owns the run folder, wait for it instead of "
                        "failing")  # fmt: skip
    _add_data_check_flag(p, "go on with a run folder whose data (its recorded fingerprint) "
                         "have changed; the report then mixes models trained on both")  # fmt: skip
    _add_config_flags(p.add_argument_group("settings of the run (saved in run.json)"))
    return p


def _add_data_check_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--allow-changed-data", action="store_true", help=help)


def _settings(args) -> Dict[str, object]:
    """The settings flags that were given (the others keep ExperimentConfig's defaults)."""
    return {k: v for k, v in vars(args).items() if k not in (*_RUN_OPTIONS, "command")}


def _run_config(args):
    """(configuration, run folder) of a train command."""
    from spnn_fast._io import check_path_arg
    from spnn_fast.config import ExperimentConfig
    from spnn_fast.runfolder import read_run_config

    for flag, value in (("--out", args.out), ("--resume", args.resume)):
        if value is not None:
            check_path_arg(flag, value, "a run folder")
    given = _settings(args)
    if not args.resume:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return ExperimentConfig(**given), args.out or os.path.join("runs", stamp)
    ignored = [k for k in given if k not in ("device", "teacher_cache_mb")]
    if ignored or args.out:
        flags = ", ".join(
            "--" + k.replace("_", "-") for k in ignored + (["out"] if args.out else [])
        )
        raise ValueError(
            f"--resume {args.resume} continues the run with the settings in its run.json; "
            f"{flags} would be ignored (to add seeds: --out {args.resume} --seeds N with the "
            f"run's settings)"
        )
    if not os.path.exists(os.path.join(args.resume, "run.json")):
        raise ValueError(f"--resume {args.resume}: no run.json there")
    cfg = read_run_config(args.resume, given.get("device"))
    if "teacher_cache_mb" in given:
        cfg = dataclasses.replace(cfg, teacher_cache_mb=given["teacher_cache_mb"])
    return cfg, args.resume


def _threads(args, folder: str) -> Tuple[Optional[int], str]:
    """(the CPU threads of a train command, a warning or ""): ``--threads``, else the count in
    the run.json of the run it goes on with (None: torch's default)."""
    from spnn_fast.runfolder import has_models, read_run_threads

    saved = None
    goes_on = getattr(args, "resume", None) or has_models(folder)  # distill: the run's models
    if os.path.isfile(os.path.join(folder, "run.json")) and goes_on:
        saved = read_run_threads(folder)
    if args.threads is None or saved is None or args.threads == saved:
        return (saved if args.threads is None else args.threads), ""
    return args.threads, (
        f"warning: the run in {folder} was trained with --threads {saved}; --threads "
        f"{args.threads} may change its remaining models in the last bits (its run.json keeps "
        f"{saved})"
    )


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


def _check_threads(threads: Optional[int]) -> None:
    """ValueError unless ``--threads`` is None or a count the machine can start: at most four
    per CPU (more only wait for the cores, and thread creation fails long before 100,000)."""
    most = 4 * (os.cpu_count() or 1)
    if threads is not None and not 1 <= threads <= most:
        raise ValueError(f"--threads must be in [1, {most}] (4 per CPU of this machine), "
                         f"got {threads}")  # fmt: skip


def _cmd_train(args) -> int:
    from spnn_fast._threads import fix_threads, retain_freed_memory
    from spnn_fast.experiment import run
    from spnn_fast.report import markdown

    _check_threads(args.threads)
    cfg, out = _run_config(args)
    args.folder = out  # where a message says to go on
    # The same sums in the same order on every run: a fixed thread count for every op, the
    # run's own when it goes on.
    threads, warning = _threads(args, out)
    fix_threads(threads)
    retain_freed_memory()  # speed only: the same results either way
    distributed = _init_distributed(cfg.device, args.dist_timeout)
    log = lambda *a, **k: print(*a, **k, flush=True)  # noqa: E731  (seen at once through a pipe)
    if distributed:
        import torch.distributed as dist

        if cfg.device.startswith("cuda"):
            cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        if dist.get_rank() != 0:
            log = lambda *a, **k: None  # noqa: E731
    if warning:
        log(warning)
    try:
        report = run(cfg, out, log=log, wait=args.wait,
                     allow_changed_data=args.allow_changed_data)  # fmt: skip
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
            dist.destroy_process_group()
    return 0


def _cmd_distill(args) -> int:
    from spnn_fast import distill_run
    from spnn_fast._io import check_path_arg
    from spnn_fast._threads import fix_threads, retain_freed_memory

    check_path_arg("RUN", args.run, "a run folder")
    _check_threads(args.threads)
    threads, warning = _threads(args, args.run)  # the run's own, as its student_kd had
    fix_threads(threads)
    retain_freed_memory()  # speed only: the same results either way
    log = lambda *a, **k: print(*a, **k, flush=True)  # noqa: E731
    if warning:
        log(warning)
    return distill_run.main(args, log=log)


def _cmd_eval(args) -> int:
    from spnn_fast.experiment import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.device, args.dataset,
                                  allow_changed_data=args.allow_changed_data,
                                  log=lambda m: print(m, file=sys.stderr))  # fmt: skip
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
    _train_parser(sub)
    pe = sub.add_parser("eval", help="evaluate a saved model (best.pt) on every split")
    pe.add_argument("checkpoint")
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--dataset", default=None, help="override the data set stored in it")
    pe.add_argument("--json", action="store_true")
    _add_data_check_flag(pe, "evaluate on data whose fingerprint differs from the one the "
                         "checkpoint records")  # fmt: skip
    sub.add_parser("info", help="print what runs here (backends)")
    from spnn_fast import distill_run, recommend

    recommend.add_arguments(
        sub.add_parser("recommend", help="the top-k next items of users, from a trained run")
    )
    distill_run.add_arguments(sub.add_parser(
        "distill", help="train one model of any width from a finished run's teachers",
        description="Train one model from the teachers of a finished run (their ensemble, its "
                    "seed's teacher, or none), as the run's student_kd but for its shape, into "
                    "RUN/seed<S>/<NAME>, and report it next to the teachers.",
    ))  # fmt: skip
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info,
                "recommend": recommend.main, "distill": _cmd_distill}  # fmt: skip
    try:
        return commands[args.command](args)
    except _user_errors() as e:
        print(f"spnn-fast: error: {_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every file is written atomically, the lock given back
        hint = f"; {_go_on(args)}" if args.command in ("train", "distill") else ""
        print(f"spnn-fast: interrupted{hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


def _user_errors() -> tuple:
    """What a command reports in one line, without a traceback: bad settings and data, damaged
    files, a busy run folder, what cannot run here, and the file system's errors."""
    from spnn_fast._lock import FolderBusyError
    from spnn_fast.backends import BackendUnavailableError
    from spnn_fast.download import DatasetUnavailableError

    return (ValueError, TypeError, OSError, FolderBusyError, BackendUnavailableError,
            DatasetUnavailableError)  # fmt: skip


def _message(e: BaseException, args) -> str:
    if not isinstance(e, OSError) or not e.strerror:
        return str(e)
    text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if e.errno == errno.ENOSPC and args.command in ("train", "distill"):
        text += f"; free some space, then {_go_on(args)}"
    return text


def _go_on(args) -> str:
    """How to go on with a train command that stopped: resume its run folder when it holds a
    run (run.json), else run the command again (a run refused by its checks leaves no
    folder); a distill command goes on when run again."""
    if args.command == "distill":
        return "run the same command again to go on (its finished epochs are kept)"
    folder = getattr(args, "folder", None) or args.resume or args.out
    if folder and os.path.isfile(os.path.join(folder, "run.json")):
        return f"go on with --resume {folder} (finished models are kept)"
    return "run the command again"


if __name__ == "__main__":
    sys.exit(main())
