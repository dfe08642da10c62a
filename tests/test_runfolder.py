"""Run folders: owned by one process at a time, tied to the data they were trained on, and read
back through checks that name a damaged file. The concurrent-run and changed-data cases run
real processes (``python -m spnn_fast``)."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _tiny_experiment, _write_cycle_csv

import spnn_fast.experiment
import spnn_fast.runfolder
import spnn_fast.train
from spnn_fast import _io, _lock
from spnn_fast.cli import main
from spnn_fast.experiment import MODELS, run
from spnn_fast.runfolder import LOCK_NAME, FolderBusyError, claim

_TINY = ["--seeds", "1", "--epochs", "1", "--max-len", "8", "--teacher-d", "16",
         "--teacher-layers", "1", "--student-d", "4", "--batch-size", "8", "--threads", "1"]  # fmt: skip
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args, cwd=None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spnn_fast", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=_ENV,
                          **kw)  # fmt: skip


def _one_line_error(proc_or_text) -> str:
    """The error a command printed: one line, no traceback."""
    err = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    lines = [x for x in err.strip().splitlines() if x.startswith("spnn-fast: error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}  # fmt: skip


# The holder of a folder in these tests: a process that claims it, says so, and keeps it until
# its stdin closes (or it is killed).
_HOLDER = """
import sys
from spnn_fast.runfolder import claim
with claim(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _hold(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_ENV)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------------- case 1: ownership
def test_a_second_run_fails_at_once_naming_the_holder_or_waits(tmp_path):
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        proc = _cli("train", "--data", data, "--out", out, *_TINY)
        assert proc.returncode == 2
        line = _one_line_error(proc)
        assert f"the run folder {out} is in use by process {holder.pid} on host " in line
        assert "wait for it with --wait, or write to another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # it wrote nothing
        # With --wait it waits, and runs once the holder is gone.
        waiting = subprocess.Popen(
            [sys.executable, "-m", "spnn_fast", "train", "--data", data, "--out", str(out),
             "--wait", *_TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_ENV)  # fmt: skip
        first = waiting.stdout.readline()
        assert f"is in use by process {holder.pid}" in first and "waiting until it is free" in first
        assert not (out / "run.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stderr[-3000:]
    assert (out / "report.json").is_file()


def test_two_runs_started_together_never_mix_their_models(tmp_path):
    # The case: two runs with other settings on one folder at the same time. One owns
    # the folder and runs; the other is refused (the folder is busy, or, if it comes second,
    # holds a run of other settings); the report is the winner's alone.
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    flags = {"a": ["--epochs", "1", "--lr", "0.01"], "b": ["--epochs", "2", "--lr", "0.002"]}
    procs = {k: subprocess.Popen(
        [sys.executable, "-m", "spnn_fast", "train", "--data", data, "--out", str(out),
         *_TINY, *f], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV)
        for k, f in flags.items()}  # fmt: skip
    # communicate(), not wait(): a child blocked on a full pipe would never end
    done = {k: (p.communicate(timeout=300)[1], p.returncode)[::-1] for k, p in procs.items()}
    winners = [k for k, (rc, _) in done.items() if rc == 0]
    assert len(winners) == 1, done
    loser = "b" if winners == ["a"] else "a"
    assert done[loser][0] == 2
    line = _one_line_error(done[loser][1])
    assert "is in use by process" in line or "holds a run with another configuration" in line
    want = {"a": (1, 0.01), "b": (2, 0.002)}[winners[0]]
    saved = json.loads((out / "run.json").read_text())["config"]
    report = json.loads((out / "report.json").read_text())
    assert (saved["epochs"], saved["lr"]) == want == (report["config"]["epochs"],
                                                      report["config"]["lr"])  # fmt: skip
    for name in MODELS:
        result = json.loads((out / "seed0" / name / "result.json").read_text())
        assert result["epochs_run"] == want[0]


def test_under_torchrun_a_busy_folder_stops_every_rank(tmp_path):
    # Rank 0 alone takes the lock; the other rank learns it failed rather than waiting for it
    # in the first collective until --dist-timeout.
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "spnn_fast", "train", "--data", data, "--out",
               str(out), "--dist-timeout", "600", *_TINY]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_ENV)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Ended (with --dist-timeout 600 a waiting rank would have outlived the timeout above),
    # failed, and said why; torchrun stops the other rank once one has exited.
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("spnn-fast: error:")]
    assert errors and all(f"is in use by process {holder.pid}" in x for x in errors), proc.stderr


def test_a_lock_dies_with_its_holder(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    with pytest.raises(FolderBusyError, match=f"in use by process {holder.pid}"):
        with claim(str(out)):
            pass
    holder.send_signal(signal.SIGKILL)  # no release, no cleanup
    holder.wait(timeout=60)
    with claim(str(out)):  # the kernel released its flock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (out / LOCK_NAME).read_text() == ""  # released: no holder named any more


def test_a_folder_is_held_against_this_process_too_and_given_back(tmp_path):
    out = str(tmp_path / "run")
    with claim(out):
        with pytest.raises(FolderBusyError, match=rf"in use by process {os.getpid()} on host"):
            with claim(out):
                pass
    with claim(out):  # released when the block ended
        pass
    # A claim whose block fails gives back the folder it created, when nothing else is in it.
    with pytest.raises(KeyError):
        with claim(str(tmp_path / "new")):
            raise KeyError("refused")
    assert not (tmp_path / "new").exists()


def test_without_fcntl_the_lock_is_a_file_to_delete_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(_lock, "fcntl", None)
    out = tmp_path / "run"
    with claim(str(out)):
        with pytest.raises(
            FolderBusyError, match=rf"if that process is gone, delete .*{LOCK_NAME}"
        ):
            with claim(str(out)):
                pass
    assert not (out / LOCK_NAME).exists()  # released: the file is removed


# ---------------------------------------------------------------------------- case 2: the data
def test_resume_and_eval_refuse_changed_data_naming_both(tmp_path):
    data = Path(_write_cycle_csv(tmp_path / "cycle.csv"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *_TINY]) == 0
    recorded = json.loads((out / "run.json").read_text())["data"]
    assert recorded["source"] == str(data) and recorded["files"]["cycle.csv"]["bytes"] > 0
    before = _hashes(out)
    data.write_text(data.read_text() + "u0,3,99999\n")  # the user edits the data
    best = out / "seed0" / "student_kd" / "best.pt"
    for args in (["train", "--resume", out], ["eval", best]):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line_error(proc)
        assert f"{data} is not the data" in line and "--allow-changed-data" in line
        now, then = (f"cycle.csv ({n:,} bytes" for n in (data.stat().st_size,
                                                           recorded["files"]["cycle.csv"]["bytes"]))  # fmt: skip
        assert line.index(now) < line.index(then)  # both named: what is there, what was used
    assert _hashes(out) == before  # nothing written
    proc = _cli("eval", best, "--allow-changed-data", "--json")
    assert proc.returncode == 0 and "is not the data" in proc.stderr
    assert set(json.loads(proc.stdout)) == {"valid", "test", "cold@3", "cold@5", "cold@10"}
    proc = _cli("train", "--resume", out, "--allow-changed-data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "going on (--allow-changed-data)" in proc.stdout
    # run.json now records the data the run goes on with, and the data it was trained on
    saved = json.loads((out / "run.json").read_text())
    assert saved["data"]["files"]["cycle.csv"]["bytes"] == data.stat().st_size
    assert saved["earlier_data"] == [recorded]
    assert json.loads((out / "report.json").read_text())["earlier_data"] == [recorded]


def test_a_relative_data_path_is_recorded_absolute(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_cycle_csv(tmp_path / "a" / "cycle.csv")
    # Another file of the same name where the next commands run: it must not be read.
    _write_cycle_csv(tmp_path / "b" / "cycle.csv", users=7)
    out = tmp_path / "run"
    proc = _cli("train", "--data", "cycle.csv", "--out", out, *_TINY, cwd=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["dataset"] == str(tmp_path / "a" / "cycle.csv")
    proc = _cli("train", "--resume", out, cwd=tmp_path / "b")
    assert proc.returncode == 0 and "already done" in proc.stdout, proc.stderr[-3000:]
    proc = _cli("eval", out / "seed0" / "teacher" / "best.pt", "--json", cwd=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is not the data" not in proc.stderr  # the recorded data, unchanged


def test_a_run_folder_of_the_previous_layout_goes_on(finished_run, tmp_path, monkeypatch, capsys):
    # run.json as spnn_fast wrote it before: the path as given (relative), no data fingerprint.
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "run.json").read_text())
    data = Path(saved.pop("data")["source"])
    saved.pop("chosen", None)
    saved.pop("threads", None)
    monkeypatch.chdir(data.parent)
    saved["config"]["dataset"] = data.name
    (out / "run.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "records no fingerprint of its data" in printed and "already done" in printed


# ---------------------------------------------------------------------------- threads
def test_a_run_keeps_its_thread_count(tmp_path, capsys):
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    before = torch.get_num_threads()
    try:
        assert main(["train", "--data", data, "--out", str(out), *_TINY]) == 0  # --threads 1
        assert json.loads((out / "run.json").read_text())["threads"] == 1
        student_kd = out / "seed0" / "student_kd"
        for again in ([], ["--threads", "2"]):
            # The last model stopped before its results: resuming trains it from its last.pt.
            for f in ("best.pt", "result.json"):
                (student_kd / f).unlink()
            torch.set_num_threads(2)  # what a new process may start with
            capsys.readouterr()
            assert main(["train", "--resume", str(out), *again]) == 0
            printed = capsys.readouterr().out
            report = json.loads((out / "report.json").read_text())
            assert report["threads"] == (2 if again else 1)
            warned = f"warning: the run in {out} was trained with --threads 1" in printed
            assert warned == bool(again), printed
            assert json.loads((out / "run.json").read_text())["threads"] == 1  # the run's own
        # --out DIR with the same settings goes on with the run as --resume does
        torch.set_num_threads(2)
        assert main(["train", "--data", data, "--out", str(out), *_TINY[:-2]]) == 0
        assert json.loads((out / "report.json").read_text())["threads"] == 1
        # A run.json without threads (an older spnn_fast) goes on with torch's count.
        saved = json.loads((out / "run.json").read_text())
        saved.pop("threads")
        (out / "run.json").write_text(json.dumps(saved))
        assert main(["train", "--resume", str(out)]) == 0
        saved["threads"] = "two"
        (out / "run.json").write_text(json.dumps(saved))
        capsys.readouterr()
        assert main(["train", "--resume", str(out)]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"{out / 'run.json'}: 'threads' must be an integer >= 1, got a string" in line
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- case 4: damage
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data = _write_cycle_csv(root / "cycle.csv")
    run(_tiny_experiment(data, epochs=1), str(root / "run"), log=lambda *a: None)
    return root / "run"


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(len(raw)))
    elif how == "wrong keys" and path.suffix == ".pt":
        torch.save({"weights": torch.zeros(3)}, path)
    elif how == "wrong keys":
        path.write_text(json.dumps({"format": "spnn_fast.run/2", "config": {"nonsense": 1}}))
    elif how == "wrong values":
        obj = json.loads(raw)
        if "config" in obj:
            obj["config"]["seeds"] = -1
        else:
            obj["metrics"] = {"test": "high"}
        path.write_text(json.dumps(obj))
    elif how == "another model's":  # a whole checkpoint, of another shape
        shutil.copy(path.parent.parent / "teacher" / path.name, path)
    else:
        raise AssertionError(how)


_DAMAGED = [
    ("run.json", how) for how in ("empty", "truncated", "random", "wrong keys", "wrong values")
] + [
    ("seed0/teacher/result.json", how)
    for how in ("empty", "truncated", "random", "wrong keys", "wrong values")
] + [
    ("seed0/teacher/best.pt", how) for how in ("empty", "truncated", "random", "wrong keys")
] + [
    ("seed0/student/last.pt", how)
    for how in ("empty", "truncated", "random", "wrong keys", "another model's")
]  # fmt: skip
_RECOVERY = {
    "run.json": "train into another --out",
    "result.json": "delete it to evaluate that model again",
    "best.pt": "delete it (and its result.json) to train that model again",
    "last.pt": "delete it to train this model again from its first epoch",
}


@pytest.mark.parametrize(("name", "how"), _DAMAGED, ids=[f"{n}-{h}" for n, h in _DAMAGED])
def test_a_damaged_file_is_named_with_its_recovery_and_nothing_is_written(
    finished_run, tmp_path, capsys, name, how
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    if name.endswith("last.pt"):  # the student was stopped mid-training: its last.pt is read
        for f in ("result.json", "best.pt"):
            (out / "seed0" / "student" / f).unlink()
    _damage(out / name, how)
    before = _hashes(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(out / name) in line and _RECOVERY[Path(name).name] in line
    assert _hashes(out) == before
    if name.endswith("best.pt"):
        assert main(["eval", str(out / name)]) == 2
        assert str(out / name) in _one_line_error(capsys.readouterr().err)


def test_the_recovery_a_damaged_last_pt_names_works(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    student = out / "seed0" / "student"
    for f in ("result.json", "best.pt"):
        (student / f).unlink()
    _damage(student / "last.pt", "truncated")
    assert main(["train", "--resume", str(out)]) == 2
    (student / "last.pt").unlink()  # as the message says
    assert main(["train", "--resume", str(out)]) == 0
    assert (student / "best.pt").is_file()


def test_out_naming_a_file_is_refused_before_the_data_are_read(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    missing = tmp_path / "no-such-data.csv"
    assert main(["train", "--data", str(missing), "--out", str(target), *_TINY]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{target} is a file, not a run folder" in line
    assert target.read_text() == "keep me"


def test_an_unwritable_run_folder_is_refused_before_the_data_are_read(tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    missing = tmp_path / "no-such-data.csv"
    out = tmp_path / "locked"
    if os.geteuid() != 0:  # root writes anywhere: there the refusal is simulated
        out.mkdir()
        out.chmod(0o500)
    else:

        def refuse(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.path)

        monkeypatch.setattr(_lock.LockFile, "_try_flock", refuse)
    assert main(["train", "--data", str(missing), "--out", str(out), *_TINY]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"cannot write into the run folder {out}: Permission denied" in line


def test_a_disk_too_full_for_the_checkpoints_is_found_before_training(tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    import shutil as shutil_module

    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1000))
    assert main(["train", "--data", data, "--out", str(out), *_TINY]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"checkpoints into {out}, whose disk has 0.0 MiB free" in line
    assert not out.exists()  # refused before anything was written
    # so the hint is to run the command again, not to resume a folder that is not there
    assert "--resume" not in line and "free some space, then run the command again" in line


def test_a_disk_that_fills_during_training_keeps_the_finished_models(tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    real = _io.atomic_write

    def full_for_the_student(path, write, **kw):
        if f"{os.sep}student{os.sep}" not in str(path):
            return real(path, write, **kw)

        def fill(f):  # part of the file goes out, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, fill, **kw)

    for module in (spnn_fast.train, spnn_fast.runfolder):
        monkeypatch.setattr(module, "atomic_write", full_for_the_student)
    assert main(["train", "--data", data, "--out", str(out), *_TINY]) == 2
    line = _one_line_error(capsys.readouterr().err)
    last = out / "seed0" / "student" / "last.pt"
    assert f"cannot write {last}: No space left on device" in line
    assert f"go on with --resume {out}" in line
    assert not list(out.rglob("*.tmp"))  # no partial file left
    teacher = _hashes(out / "seed0" / "teacher")
    assert set(teacher) == {"last.pt", "best.pt", "result.json"}
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    assert _hashes(out / "seed0" / "teacher") == teacher  # reused, not retrained


def test_run_file_names_a_file_of_the_run_by_any_path(finished_run, tmp_path, monkeypatch):
    from spnn_fast.runfolder import run_file, run_of_checkpoint

    best = finished_run / "seed0" / "teacher" / "best.pt"
    os.link(best, tmp_path / "hard.pt")
    (tmp_path / "link").symlink_to(finished_run)
    monkeypatch.chdir(finished_run / "seed0")
    for path, file in [
        (best, best),
        ("teacher/../../run.json", finished_run / "run.json"),  # relative, with ..
        (tmp_path / "link" / "report.md", finished_run / "report.md"),  # through a symlink
        (tmp_path / "hard.pt", best),  # a hard link
        (finished_run / "seed7" / "student" / "best.pt", None),  # not written yet: still the run's
    ]:
        got = run_file(str(finished_run), str(path))
        assert got is not None and (file is None or os.path.samefile(got, file)), path
    for path in (finished_run / "recs.csv", tmp_path / "run.json", finished_run / "seed0"):
        assert run_file(str(finished_run), str(path)) is None, path
    assert run_of_checkpoint(str(best)) == str(finished_run)
    assert run_of_checkpoint(str(tmp_path / "hard.pt")) is None


# ---------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_training_says_how_to_resume_and_leaves_a_resumable_folder(tmp_path):
    import time

    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    flags = [*_TINY, "--epochs", "8", "--patience", "8"]
    cmd = [sys.executable, "-m", "spnn_fast", "train", "--data", data, "--out", str(out), *flags]
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        # SIGINT's default action in the child even where this test runs with it ignored (a
        # background job of a shell without job control): Python then turns it into Ctrl-C
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=_ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        last = out / "seed0" / "teacher" / "last.pt"
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        proc.send_signal(signal.SIGINT)  # while the teacher trains (or writes its last.pt)
        assert proc.wait(timeout=120) == 130
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("spnn-fast: ")]
    assert lines == [f"spnn-fast: interrupted; go on with --resume {out} (finished models "
                     f"are kept)"], err[-3000:]  # fmt: skip
    assert not list(out.rglob("*.tmp"))  # no partial file left
    assert _io.load_checkpoint_file(last, "cpu", spnn_fast.train._STATE_KEYS)["epoch"] >= 1
    with claim(str(out)):  # the lock was given back
        pass
    proc = _cli("train", "--resume", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed after epoch" in proc.stdout
    assert (out / "report.json").is_file()


def test_ctrl_c_before_the_run_folder_holds_a_run_says_to_run_again(tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(spnn_fast.experiment, "load", interrupted)  # while the data are read
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    assert main(["train", "--data", data, "--out", str(out), *_TINY]) == 130
    assert capsys.readouterr().err == "spnn-fast: interrupted; run the command again\n"
    assert not out.exists()  # the folder it had created is removed


_BAD_RUN_JSON = [
    ({"config": "student_d=4"}, "'config' must be an object, got a string"),
    ({"config": [1, 2]}, "'config' must be an object, got an array"),
    ({"config": None}, "'config' must be an object, got null"),
    ({"format": 2}, "is not a run of this spnn_fast (format 2, expected 'spnn_fast.run/2')"),
    ({"threads": 0}, "'threads' must be an integer >= 1, got the number 0"),
    ({"data": "cycle.csv"}, "its data fingerprint is damaged"),
    ({"config": {"nonsense": 1, "seeds": 1}}, "unknown settings: nonsense"),
    ({"config": {"seeds": "1"}}, "seeds='1' must be an integer >= 1"),
    ({"config": {"device": 5}}, "'device' must be a string, got the number 5; pass --device"),
]


@pytest.mark.parametrize(("change", "message"), _BAD_RUN_JSON, ids=[m for _, m in _BAD_RUN_JSON])
def test_a_run_json_of_the_wrong_structure_says_what_is_wrong(finished_run, tmp_path, capsys,
                                                              change, message):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "run.json").read_text())
    for key, value in change.items():
        saved[key] = (
            {**saved[key], **value} if key == "config" and isinstance(value, dict) else value
        )
    (out / "run.json").write_text(json.dumps(saved))
    before = _hashes(out)
    assert main(["train", "--resume", str(out)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(out / "run.json") in line and message in line, line
    assert "train into another" in line  # the recovery
    assert _hashes(out) == before


def test_a_checkpoint_with_nan_weights_is_named_with_its_parameter(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    best = out / "seed0" / "teacher" / "best.pt"
    ck = torch.load(best, weights_only=True)
    name = sorted(ck["state_dict"])[-1]
    ck["state_dict"][name][..., 0] = float("nan")
    torch.save(ck, best)
    before = _hashes(out)
    for argv in (["eval", str(best)], ["recommend", str(out), "--model", "teacher"],
                 ["train", "--resume", str(out)]):  # fmt: skip
        assert main(argv) == 2, argv
        line = _one_line_error(capsys.readouterr().err)
        assert f"{best}: its parameter {name} holds NaN or infinite values" in line, line
        assert "delete it (and its result.json) to train that model again" in line
    assert _hashes(out) == before
    # A stopped model's last.pt: its model, its best state or its optimizer's moments.
    student = out / "seed0" / "student"
    shutil.copy(finished_run / "seed0" / "teacher" / "best.pt", best)
    for f in ("result.json", "best.pt"):
        (student / f).unlink()
    clean = torch.load(student / "last.pt", weights_only=True)
    for where in ("objective", "best", "optimizer"):
        st = copy.deepcopy(clean)
        table = {"objective": st["objective"], "best": st["best"]["state"],
                 "optimizer": st["optimizer"]["state"][0]}[where]  # fmt: skip
        key = "exp_avg" if where == "optimizer" else sorted(table)[0]
        table[key].view(-1)[0] = float("inf")
        torch.save(st, student / "last.pt")
        assert main(["train", "--resume", str(out)]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"{student / 'last.pt'} is damaged or belongs to another model" in line, line
        assert "holds NaN or infinite values" in line and key in line, line
    torch.save(clean, student / "last.pt")
    assert main(["train", "--resume", str(out)]) == 0


@pytest.mark.parametrize("flag", ["--out", "--resume"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_out_or_resume_is_refused(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.chdir(tmp_path)
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    assert main(["train", "--data", data, flag, value, *_TINY]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{flag} must name a run folder, got {value!r}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycle.csv"]  # no runs/<stamp>


def test_a_run_from_before_the_loss_setting_keeps_the_full_loss(finished_run, tmp_path):
    """A run.json written before --loss existed trained with the full cross-entropy: reading it
    back gives loss 'full', not the new default 'auto' (which would switch a large catalogue's
    run to the sampled loss on --resume)."""
    from spnn_fast.runfolder import read_run_config

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    path = old / "run.json"
    saved = json.loads(path.read_text())
    del saved["config"]["loss"]
    path.write_text(json.dumps(saved))
    assert read_run_config(str(old)).loss == "full"
    assert read_run_config(str(finished_run)).loss == "auto"
