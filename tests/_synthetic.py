"""Synthetic interaction logs shaped like the MovieLens data sets, in MovieLens-1M's files
(``ratings.dat``, ``movies.dat``, ``users.dat``), for tests that need a catalogue of a real size
without the network.

``write_movielens(folder)`` gives MovieLens-1M's shape: 6,040 users, 3,706 rated items, 18
genres, the ML-1M age groups, 21 occupations. ``users=943, items=1682, genres=19`` gives
MovieLens-100K's catalogue and feature vocabularies (so the same parameter counts). Each user
rates between ``events[0]`` and ``events[1]`` items (MovieLens-1M: at least 20, 165 on average;
tests use fewer to stay fast); every item is rated at least once.

As a script: ``python tests/_synthetic.py FOLDER [--events LO HI]`` writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import numpy as np

ML1M_USERS, ML1M_ITEMS = 6040, 3706
_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
           "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
           "Thriller", "War", "Western", "unknown")  # fmt: skip
_AGES = (1, 18, 25, 35, 45, 50, 56)


def write_movielens(
    folder, *, users: int = ML1M_USERS, items: int = ML1M_ITEMS, genres: int = 18,
    events: Tuple[int, int] = (20, 40), seed: int = 0,
) -> Path:  # fmt: skip
    """Write the three files into ``folder``; returns the path of ``ratings.dat``."""
    lo, hi = events
    if not 1 <= lo <= hi or not 1 <= genres <= len(_GENRES):
        raise ValueError(f"events={events} must be 1 <= lo <= hi; genres={genres} in [1, 19]")
    if users * hi < items:
        raise ValueError(f"{users} users x at most {hi} events cannot rate all {items} items")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = rng.integers(lo, hi + 1, size=users)
    total = int(counts.sum())
    if total < items:  # every item rated at least once: lengthen the histories
        counts += -(-(items - total) // users)
    # Popularity skewed as in MovieLens; the first `items` events cover every item once.
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    picks = rng.choice(items, size=int(counts.sum()), p=popularity / popularity.sum())
    picks[:items] = rng.permutation(items)
    picks = rng.permutation(picks) + 1
    rows, start = [], 0
    for u, n in enumerate(counts, start=1):
        t0 = 956_703_932 + int(rng.integers(0, 10**7))
        gaps = np.cumsum(rng.integers(1, 3_600, size=n))
        for item, t in zip(picks[start : start + n], t0 + gaps):
            rows.append(f"{u}::{item}::{int(rng.integers(1, 6))}::{t}")
        start += n
    (folder / "ratings.dat").write_text("\n".join(rows) + "\n")
    names = _GENRES[:genres]
    movies = []
    for i in range(1, items + 1):
        k = int(rng.integers(1, 4))
        g = "|".join(
            names[j] for j in sorted(rng.choice(genres, size=min(k, genres), replace=False))
        )
        movies.append(f"{i}::Movie {i} (1999)::{g}")
    (folder / "movies.dat").write_text("\n".join(movies) + "\n")
    people = [f"{u}::{'MF'[int(rng.integers(0, 2))]}::{_AGES[int(rng.integers(0, 7))]}::"
              f"{int(rng.integers(0, 21))}::{int(rng.integers(10000, 99999))}"
              for u in range(1, users + 1)]  # fmt: skip
    (folder / "users.dat").write_text("\n".join(people) + "\n")
    return folder / "ratings.dat"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--events", type=int, nargs=2, default=(20, 40), metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_movielens(a.folder, events=tuple(a.events), seed=a.seed))
