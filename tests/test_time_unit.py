"""A run on millisecond timestamps: spnn-fast train --time-unit ms reads them (and refuses them
without it), records the unit, and eval reads the data again in that unit."""

from __future__ import annotations

import pytest
from test_train import _tiny_experiment

from spnn_fast.config import ExperimentConfig
from spnn_fast.distill_run import distill
from spnn_fast.experiment import checkpoint_data, run
from spnn_fast.runfolder import load_checkpoint


def _write_ms_csv(path, users=6, length=14, items=7):
    rows = ["user,item,timestamp"]
    for u in range(users):
        for t in range(length):
            rows.append(f"u{u},{(u + t) % items + 1},{1_600_000_000_000 + 10**6 * u + 60_000 * t}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_a_run_reads_and_records_its_time_unit(tmp_path):
    data = _write_ms_csv(tmp_path / "ms.csv")
    with pytest.raises(ValueError, match="time_unit"):
        run(_tiny_experiment(data, epochs=1), str(tmp_path / "refused"), log=lambda *a: None)
    run(_tiny_experiment(data, epochs=1, time_unit="ms"), str(tmp_path / "run"),
        log=lambda *a: None)  # fmt: skip
    path = str(tmp_path / "run" / "seed0" / "teacher" / "best.pt")
    _, ck = load_checkpoint(path)
    assert ck["time_unit"] == "ms"
    ds = checkpoint_data(path, ck, log=lambda *a: None)
    assert int(ds.log.timestamps.max()) < 2 * 10**9  # seconds again
    # spnn-fast distill reads the run's data in the run's unit too
    report = distill(str(tmp_path / "run"), width=8, heads=2, teachers="seed", log=lambda *a: None)
    assert report["rows"], report


@pytest.mark.parametrize("bad", ["sec", "MS", 1000])
def test_an_unknown_time_unit_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"time_unit=.* must be None or one of s, ms, us, ns"):
        ExperimentConfig(time_unit=bad)
