"""Seeded synthetic implicit-feedback logs of a real shape, for loading and training at real
size without the network: Zipf item popularity, log-normal user activity, and timestamps whose
gaps run from seconds (a session) to months (a user coming back).

* Users: ``users`` raw ids (distinct random integers), each with at least one event; activity is
  log-normal (sigma 1.2: a few heavy users, a long tail of light ones), scaled to ``events``.
* Items: ``items`` raw ids 1..items; the popularity of the item of rank r is proportional to
  ``r ** -zipf`` (exponent 1.0 by default), the ranks shuffled over the ids, so an id says
  nothing of its popularity. Items nobody drew do not appear in the log.
* Timestamps: seconds. A gap between two events of a user is within a session
  (log-uniform, 1 second to 1 hour) or a return (log-uniform, 1 hour to 180 days); a user
  returns at half of the gaps, or at 100 of them if that is fewer (heavy users browse in long
  sessions). Each history starts at a uniform time that keeps it within 2015-2023 where it
  fits (a history of thousands of events may run a little later).
* Rows are written in time order (as an export of an event table), with the header
  ``user,item,timestamp``.

Vectorized numpy; CSV is written by pyarrow where it is installed (else by numpy in blocks),
Parquet by pyarrow::

    python benchmarks/synthetic.py --events 5000000 --users 30000 --items 1000000 \\
        --out DIR --format csv parquet --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

START, END = 1_420_070_400, 1_704_067_200  # 2015-01-01 .. 2024-01-01
HOUR, MAX_GAP = 3_600, 180 * 86_400


def generate(events: int, users: int, items: int, *, seed: int = 0,
             zipf: float = 1.0) -> Dict[str, np.ndarray]:  # fmt: skip
    """``{"user", "item", "timestamp"}``: int64 columns of ``events`` rows in time order."""
    if not 1 <= users <= events or items < 1:
        raise ValueError(f"need 1 <= users={users} <= events={events} and items={items} >= 1")
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.2, users)
    counts = 1 + np.floor(activity / activity.sum() * (events - users)).astype(np.int64)
    short = events - int(counts.sum())
    counts += np.bincount(rng.choice(users, short, p=activity / activity.sum()), minlength=users)
    user_ids = rng.choice(10 * users, users, replace=False) + 1
    owner = np.repeat(np.arange(users), counts)

    popularity = np.cumsum(np.arange(1, items + 1, dtype=np.float64) ** -zipf)
    ranks = np.searchsorted(popularity, rng.random(events) * popularity[-1], side="right")
    item_of_rank = rng.permutation(items) + 1
    item = item_of_rank[np.minimum(ranks, items - 1)]

    # A gap is within a session (1 s .. 1 h) or a return (1 h .. 180 days), log-uniform; heavy
    # users return less often per event, so that a history spans years, not centuries.
    returns = rng.random(events) < np.minimum(0.5, 100.0 / counts)[owner]
    lo = np.where(returns, np.log(HOUR), 0.0)
    hi = np.where(returns, np.log(MAX_GAP), np.log(HOUR))
    gaps = np.exp(rng.uniform(lo, hi)).astype(np.int64)
    firsts = np.cumsum(counts) - counts
    gaps[firsts] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[firsts], counts)
    span = elapsed[firsts + counts - 1]
    starts = START + (rng.random(users) * np.maximum(0, END - START - span)).astype(np.int64)
    timestamp = starts[owner] + elapsed

    order = np.argsort(timestamp, kind="stable")
    return {"user": user_ids[owner][order], "item": item[order], "timestamp": timestamp[order]}


def write_csv(columns: Dict[str, np.ndarray], path: Path) -> None:
    """Comma-separated with the header ``user,item,timestamp``."""
    with open(path, "wb") as f:
        f.write(b"user,item,timestamp\n")
        try:
            import pyarrow as pa
            import pyarrow.csv as pacsv
        except ImportError:
            rows = np.stack([columns[c] for c in ("user", "item", "timestamp")], axis=1)
            for s in range(0, len(rows), 1 << 20):
                np.savetxt(f, rows[s : s + (1 << 20)], fmt="%d", delimiter=",")
            return
        table = pa.table(columns)
        pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))


def write_parquet(columns: Dict[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=30_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--format", nargs="+", choices=("csv", "parquet"), default=["csv"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    columns = generate(args.events, args.users, args.items, seed=args.seed, zipf=args.zipf)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"synthetic_{args.events}_{args.users}_{args.items}_{args.seed}"
    for fmt in args.format:
        path = args.out / f"{stem}.{fmt}"
        (write_csv if fmt == "csv" else write_parquet)(columns, path)
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
    distinct = len(np.unique(columns["item"]))
    print(f"{args.events} events, {args.users} users, {distinct} of {args.items} items drawn, "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
