"""Turn pytest-benchmark JSON files into ratio tables (markdown).

    python benchmarks/report.py results.json [more.json ...]

A ``.jsonl`` file holds the same benchmark entries one per line, as ``_common.record`` streams
them to ``$SPNN_BENCH_JSONL`` (a line cut short by a killed run is skipped).

Within each benchmark group (one configuration), every implementation is compared with the fastest
spnn_fast implementation of that group measured in the same run: the ratio column is
``time(impl) / time(spnn_fast)``, so 2.0 means spnn_fast is twice as fast as that baseline.
Implementations are read from ``extra_info["impl"]`` (set by ``_common.record``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def machine_of(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    cores = info.get("cpu", {}).get("count")
    return f"{cpu}" + (f" ({cores} cores)" if cores else "")


def tables(data: dict) -> str:
    groups: dict[str, list] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or bench["name"]].append(bench)
    out = []
    for group in sorted(groups):
        rows = groups[group]
        fast = [b for b in rows if str(b["extra_info"].get("impl", "")).startswith("spnn_fast")]
        ref = min((b["stats"]["median"] for b in fast), default=None)
        device = next(
            (b["extra_info"].get("device") for b in rows if "device" in b["extra_info"]), None
        )
        out.append(f"\n### {group}" + (f" ({device})" if device else "") + "\n")
        out.append("| impl | median | peak memory | time / spnn_fast |")
        out.append("|---|---|---|---|")
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            info = b["extra_info"]
            label = info.get("impl", b["name"])
            if "threads" in info:
                label += f" ({info['threads']} threads)"
            ratio = f"{b['stats']['median'] / ref:.2f}x" if ref else "-"
            out.append(
                f"| {label} | {_fmt_time(b['stats']['median'])} | "
                f"{_fmt_bytes(info.get('peak_bytes'))} | {ratio} |"
            )
    return "\n".join(out)


def load(path: str) -> dict:
    """A pytest-benchmark JSON file, or a ``.jsonl`` of its benchmark entries."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        rows = []
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # the last line of a run stopped while writing it
                continue
        return {"benchmarks": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    for path in args.files:
        data = load(path)
        # A .jsonl has no machine_info; each group names its device.
        print(f"## {path}" + (f": {machine_of(data)}" if "machine_info" in data else ""))
        print(tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
