"""Recommendations out of a trained SPNN for users of an interaction log, and on the command line
(the model's own :meth:`~spnn_fast.model.SPNN.recommend` serves a batch of windows).

* :func:`recommend_users` serves users of an interaction log: each user's input is the whole
  known history (training, validation and test events), of which the model reads the last
  ``max_len`` events; "seen" is every item of that whole history, so an item the user met before
  the window is not recommended either (unless ``include_seen``).
* :func:`serve`, :func:`add_arguments` and :func:`main` make ``spnn-fast recommend``::

      spnn-fast recommend RUN_OR_CHECKPOINT [--model NAME] [--seed S] [--users all|FILE]
                          [--k 10] [--include-seen] [--out FILE]

  A run folder serves ``RUN/seed<S>/<model>/best.pt`` (``--model`` default ``student_kd``, or
  the name of a model distilled in the run by ``spnn-fast distill``; ``--seed`` default 0); a
  ``best.pt`` is served as it is. The output has one row per user and
  rank, ``user, rank, item, score``, in the data set's raw ids: CSV for ``.csv`` (and on stdout
  without ``--out``), JSON Lines for ``.jsonl``. A user with fewer than ``k`` unseen items gets
  fewer rows. An ``--out`` that names a file the run reads (its data, a file of its run folder,
  the checkpoint, the ``--users`` file) is refused before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import IO, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from spnn_fast.encode import SequenceBatch, encode_batch
from spnn_fast.model import Recommendations

__all__ = [
    "add_arguments",
    "history_items",
    "main",
    "recommend_users",
    "resolve_checkpoint",
    "select_users",
    "serve",
    "user_batch",
]

DEFAULT_MODEL = "student_kd"
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


# ---------------------------------------------------------------------------- users of a log
def user_batch(log, rows: np.ndarray, max_len: int, num_time_buckets: int) -> SequenceBatch:
    """A :class:`~spnn_fast.encode.SequenceBatch` of the users ``rows``, each window ending at
    the user's last event (the whole known history; the model reads its last ``max_len``)."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = log.offsets[rows + 1] - log.offsets[rows]
    return encode_batch(
        log.offsets, log.items, log.timestamps, rows, ends, max_len,
        num_items=log.num_items, num_time_buckets=num_time_buckets,
    )  # fmt: skip


def history_items(log, rows: np.ndarray) -> Tuple[Tensor, Tensor]:
    """Every item of each user's whole history as a CSR pair ``(offsets [B + 1], item_ids)``."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, lengths = log.offsets[rows], log.offsets[rows + 1] - log.offsets[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return torch.from_numpy(offsets), torch.from_numpy(log.items[positions].astype(np.int64))


def recommend_users(
    model,
    log,
    rows: Sequence[int],
    k: int,
    *,
    include_seen: bool = False,
    batch_size: int = 256,
    backend: Optional[str] = None,
    progress: bool = False,
) -> Iterator[Tuple[np.ndarray, Recommendations]]:
    """Yield ``(rows of the batch, Recommendations)`` for the users ``rows`` (indices into the
    log's users), ``batch_size`` at a time, with a progress bar when asked (on stderr)."""
    from tqdm import tqdm

    rows = np.asarray(rows, dtype=np.int64)
    cfg = model.config
    starts = range(0, len(rows), batch_size)
    for s in tqdm(starts, desc="recommend", unit="batch", disable=not progress, file=sys.stderr):
        part = rows[s : s + batch_size]
        batch = user_batch(log, part, cfg.max_len, cfg.num_time_buckets)
        seen = None if include_seen else history_items(log, part)
        rec = model.recommend(batch, k, exclude_seen=not include_seen, seen=seen, backend=backend)
        yield part, rec


# ---------------------------------------------------------------------------- the command
def resolve_checkpoint(source: str, model: Optional[str] = None, seed: Optional[int] = None) -> str:
    """The ``best.pt`` that ``source`` names: the file itself, or in a run folder
    ``seed<seed>/<model>/best.pt`` (defaults ``student_kd`` and 0; ``model`` one of the run's
    models or of those distilled in it)."""
    from spnn_fast.distill_record import distilled_models
    from spnn_fast.experiment import MODELS

    if os.path.isfile(source):
        if model is not None or seed is not None:
            raise ValueError(
                f"--model and --seed pick a checkpoint in a run folder; {source} is a checkpoint"
            )
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"RUN_OR_CHECKPOINT {source}: no such run folder or checkpoint")
    if not os.path.isfile(os.path.join(source, "run.json")):
        raise ValueError(f"RUN_OR_CHECKPOINT {source} is a folder without run.json: not a run")
    model = DEFAULT_MODEL if model is None else model
    seed = 0 if seed is None else seed
    known = (*MODELS, *distilled_models(source))
    if model not in known:
        raise ValueError(f"--model {model!r} is not one of {', '.join(known)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    path = os.path.join(source, f"seed{seed}", model, "best.pt")
    if not os.path.isfile(path):
        have = sorted(
            f"{s}/{m}"
            for s in os.listdir(source)
            if s.startswith("seed") and os.path.isdir(os.path.join(source, s))
            for m in known
            if os.path.isfile(os.path.join(source, s, m, "best.pt"))
        )
        raise FileNotFoundError(
            f"--model {model} --seed {seed}: {path} does not exist (the run holds "
            f"{', '.join(have) or 'no trained model yet'})"
        )
    return path


def select_users(log, users: str) -> np.ndarray:
    """User rows of ``log`` for ``users``: ``"all"``, or a file of raw user ids, one per line
    (blank lines skipped), in the file's order. The file is decoded as the data loader decodes
    data files (UTF-8 without a BOM, else latin-1), so its ids are spelled as the log's."""
    import io
    from pathlib import Path

    from spnn_fast._tables import read_text

    if users == "all":
        return np.arange(log.num_users, dtype=np.int64)
    if not os.path.isfile(users):
        raise FileNotFoundError(f"--users {users}: no such file (or pass --users all)")
    try:
        text = read_text(Path(users))
    except OSError as e:
        raise OSError(e.errno, f"--users {users}: cannot read it ({e.strerror})") from None
    lines = io.StringIO(text, newline=None)  # line ends as the file's lines end: \n, \r\n, \r
    wanted = [line.strip() for line in lines if line.strip()]
    if not wanted:
        raise ValueError(f"--users {users} lists no user ids")
    index = {str(u): i for i, u in enumerate(log.user_ids)}
    unknown = [u for u in wanted if u not in index]
    if unknown:
        raise ValueError(
            f"--users {users}: {len(unknown)} of {len(wanted)} ids are not users of the data "
            f"set (first: {', '.join(unknown[:5])}); users with fewer than 3 events are dropped "
            f"when it is loaded"
        )
    return np.array([index[u] for u in wanted], dtype=np.int64)


def _output_format(out: Optional[str]) -> str:
    from spnn_fast._io import check_path_arg

    if out is None:
        return "csv"
    check_path_arg("--out", out, "a file")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: name a file (FILE.csv or FILE.jsonl)")
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(
            f"--out {out}: the suffix picks the format, one of {', '.join(OUTPUT_FORMATS)}"
        )
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {out}: the folder {folder} does not exist")
    return OUTPUT_FORMATS[suffix]


def _check_output(out: str, checkpoint: str, ck: dict, dataset: Optional[str], users: str) -> None:
    """ValueError when ``out`` names a file the run reads (its data files, its run folder's
    files, the checkpoint) or the ``--users`` file, by any path: the recommendations would
    replace it."""
    from spnn_fast._io import same_file
    from spnn_fast.fingerprint import data_files
    from spnn_fast.runfolder import run_file, run_of_checkpoint

    def refuse(what: str) -> ValueError:
        return ValueError(f"--out {out} is {what}: name another file")

    if users != "all" and same_file(out, users):
        raise refuse(f"the --users file {users}")
    recorded = ck.get("data") if isinstance(ck.get("data"), dict) else {}
    for source in {dataset, ck.get("dataset"), recorded.get("source")}:
        try:
            files = data_files(source) if isinstance(source, str) and source else []
        except (OSError, ValueError):  # no such data: checkpoint_data says so
            continue
        for f in files:
            if same_file(out, f):
                raise refuse(f"{f}, a data file of the run, which the run reads")
        # A data folder is read through its one .csv / .tsv file: a second one would end that.
        folder = os.path.dirname(os.path.abspath(out))
        if files and os.path.isdir(source) and same_file(folder, source) and \
                files[0].suffix.lower() in (".csv", ".tsv"):  # fmt: skip
            raise refuse(f"a second .csv in the data folder {source}, which the run reads "
                         f"through its one data file {files[0].name}")  # fmt: skip
    run_dir = run_of_checkpoint(checkpoint)
    taken = run_file(run_dir, out) if run_dir else None
    if taken or same_file(out, checkpoint):
        raise refuse(f"{taken or checkpoint}, a file of the run, which the run reads")


def _raw(values: np.ndarray) -> List:
    """Raw ids as plain Python values (int for integer ids, str otherwise)."""
    return values.tolist()


def _rows(log, results) -> Iterator[Tuple[object, int, object, str]]:
    """``(user, rank, item, score)`` in raw ids; the score as the shortest decimal that reads
    back to the same float32. Empty slots (item 0) are left out."""
    for part, rec in results:
        users = _raw(log.user_ids[part])
        items = rec.items.cpu().numpy()
        scores = rec.scores.cpu().numpy()
        raw_items = log.item_ids[np.maximum(items, 1) - 1]
        for b, user in enumerate(users):
            for r in range(items.shape[1]):
                if items[b, r] == 0:
                    break
                yield user, r + 1, raw_items[b, r].item(), str(scores[b, r])


def _write(rows, fmt: str, f: IO[str]) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["user", "rank", "item", "score"])
        for row in rows:
            writer.writerow(row)
            count += 1
        return count
    for user, rank, item, score in rows:
        f.write(json.dumps({"user": user, "rank": rank, "item": item, "score": float(score)}))
        f.write("\n")
        count += 1
    return count


def serve(
    source: str,
    *,
    model: Optional[str] = None,
    seed: Optional[int] = None,
    users: str = "all",
    k: int = 10,
    include_seen: bool = False,
    out: Optional[str] = None,
    device: str = "cpu",
    batch_size: int = 256,
    dataset: Optional[str] = None,
    progress: Optional[bool] = None,
    allow_changed_data: bool = False,
) -> int:
    """``spnn-fast recommend``: write each selected user's top ``k`` to ``out`` (CSV on stdout
    when None); returns the number of rows written. ``progress=None`` shows a bar when the users
    take more than one batch. Arguments as the command's flags (see the module docstring).

    Raises:
        FileNotFoundError: no such run folder, checkpoint, model in the run, users file or
            output folder. ValueError: a bad argument (named as its flag).
    """
    from spnn_fast._io import atomic_write
    from spnn_fast.experiment import checkpoint_data
    from spnn_fast.runfolder import load_checkpoint

    for flag, value, low in (("--k", k, 1), ("--batch-size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    fmt = _output_format(out)
    path = resolve_checkpoint(source, model, seed)
    net, checkpoint = load_checkpoint(path, device)
    if out is not None:
        _check_output(out, path, checkpoint, dataset, users)
    try:
        ds = checkpoint_data(path, checkpoint, dataset, allow_changed_data=allow_changed_data,
                             log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except FileNotFoundError as e:
        flag = f"--dataset {dataset}" if dataset is not None else f"{path}'s data set"
        raise FileNotFoundError(f"{flag}: {e}; pass --dataset") from None
    v = ds.log.num_items
    if k > v:
        raise ValueError(f"--k must be in [1, V={v}] (the data set's items), got {k}")
    rows = select_users(ds.log, users)
    net = net.to(device)
    if progress is None:
        progress = len(rows) > batch_size
    results = recommend_users(net, ds.log, rows, k, include_seen=include_seen,
                              batch_size=batch_size, progress=progress)  # fmt: skip
    lines = _rows(ds.log, results)
    if out is None:
        return _write(lines, fmt, sys.stdout)
    written = []
    atomic_write(out, lambda f: written.append(_write(lines, fmt, f)), text=True)
    return written[0]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``spnn-fast recommend`` on ``parser`` (a subcommand's parser)."""
    from spnn_fast.experiment import MODELS

    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (spnn-fast train --out) or a best.pt")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help=f"the run's model to serve: {', '.join(MODELS)} or the name of a "
                             f"model distilled in it (default {DEFAULT_MODEL})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default 0)")
    parser.add_argument("--users", default="all",
                        help="all, or a file of raw user ids, one per line")  # fmt: skip
    parser.add_argument("--k", type=int, default=10, help="items per user")
    parser.add_argument("--include-seen", action="store_true",
                        help="also recommend items the user has interacted with")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="FILE.csv or FILE.jsonl (default: CSV on stdout)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="users per forward pass")
    parser.add_argument("--dataset", default=None,
                        help="the data set (default: the one stored in the checkpoint)")  # fmt: skip
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="serve even if the data differ from those the model was trained on")  # fmt: skip
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the command for parsed ``args`` (see :func:`add_arguments`); returns 0. Errors are
    ValueError / FileNotFoundError naming the flag, for the CLI to print."""
    count = serve(
        args.source, model=args.model, seed=args.seed, users=args.users, k=args.k,
        include_seen=args.include_seen, out=args.out, device=args.device,
        batch_size=args.batch_size, dataset=args.dataset,
        allow_changed_data=args.allow_changed_data,
    )  # fmt: skip
    if args.out is not None:
        print(f"recommend: {count} rows written to {args.out}", file=sys.stderr)
    return 0
