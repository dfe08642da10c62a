"""The model, the trainer and the pipeline on tiny logs written by the tests (no network)."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from spnn_fast.config import ExperimentConfig, TrainConfig
from spnn_fast.data import load
from spnn_fast.experiment import MODELS, run
from spnn_fast.model import SPNN, SPNNConfig
from spnn_fast.runfolder import check_same_run, read_run_config
from spnn_fast.train import Trainer
from spnn_fast.windows import fresh_targets, make_batch, training_windows


def _write_cycle_csv(path, users=6, length=14, items=7):
    """Each user walks the item cycle 1..items from its own start: the next item is determined."""
    rows = ["user,item,timestamp"]
    for u in range(users):
        for t in range(length):
            rows.append(f"u{u},{(u + t) % items + 1},{1000 * u + 60 * t + (t % 3)}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture()
def cycle_ds(tmp_path):
    return load(_write_cycle_csv(tmp_path / "cycle.csv"))


def _tiny_model(ds, **kw):
    cfg = dict(num_items=ds.log.num_items, max_len=8, d_model=16, n_heads=2, n_layers=1,
               dropout=0.0)  # fmt: skip
    cfg.update(kw)
    return SPNN(SPNNConfig(**cfg), ds.item_features, ds.user_features)


def test_training_windows_cover_every_training_target(cycle_ds):
    log = cycle_ds.log
    rows, ends = training_windows(log, max_len=5)
    b = make_batch(log, rows, ends, 5, 32)
    n = np.diff(log.offsets)
    # Every transition p -> p+1 with p + 1 < n - 2 is trained exactly once; none reaches n - 2.
    assert int((b.targets > 0).sum()) == int((n - 3).sum())
    for r in range(len(rows)):
        u, e = rows[r], ends[r]
        assert e <= n[u] - 2
        last_target = int(b.targets[r, -1])
        expect = -100 if e == n[u] - 2 else int(log.items[log.offsets[u] + e])
        assert last_target == expect


def test_overlapping_windows_cover_every_target_with_long_contexts(cycle_ds):
    log = cycle_ds.log
    n = np.diff(log.offsets)
    rows, ends = training_windows(log, max_len=5, stride=2)
    for u in range(log.num_users):
        e = np.sort(ends[rows == u])[::-1]
        t = n[u] - 2
        assert e[0] == t and np.all(np.diff(e) == -2) and e[-1] <= 5  # reaches the first event
    b = make_batch(log, rows, ends, 5, 32)
    targets = fresh_targets(b.targets, ends, 5, 2)
    assert torch.equal(fresh_targets(b.targets, ends, 5, 5), b.targets)  # no overlap: all kept
    trained = []  # (user, position of the event that predicts the target, its context)
    for r in range(len(rows)):
        n_real = int(b.mask[r].sum())
        start = ends[r] - n_real
        for j in range(n_real):
            if targets[r, 5 - n_real + j] > 0:
                trained.append((int(rows[r]), start + j, j + 1))
    # Every training target once per epoch, each with >= max_len - stride + 1 = 4 events of
    # context or all the events its user has before it.
    assert sorted((u, p) for u, p, _ in trained) == [
        (u, p) for u in range(log.num_users) for p in range(n[u] - 3)
    ]
    assert all(ctx >= min(4, p + 1) for _, p, ctx in trained)
    # Without fresh_targets the overlaps would train some targets twice.
    assert int((b.targets > 0).sum()) > len(trained)
    # At stride 1 a newest window would keep only the validation event: such windows are left out.
    for max_len in (1, 5):
        rows, ends = training_windows(log, max_len=max_len, stride=1)
        b = make_batch(log, rows, ends, max_len, 32)
        kept = fresh_targets(b.targets, ends, max_len, 1)
        assert bool((kept > 0).any(1).all())
        assert int((kept > 0).sum()) == int((n - 3).sum())
    with pytest.raises(ValueError, match="stride"):
        training_windows(log, max_len=5, stride=6)


def test_model_shapes_gate_and_padding(cycle_ds):
    torch.manual_seed(0)
    model = _tiny_model(cycle_ds).eval()
    rows, ends = training_windows(cycle_ds.log, max_len=8)
    b = make_batch(cycle_ds.log, rows[:3], ends[:3], 6, 32)
    out = model(b.items, b.timestamps, b.time_buckets, b.mask, b.users, return_layers=("layers.0",))
    assert out.hidden.shape == (3, 6, 16)
    assert torch.all(out.hidden[~b.mask] == 0)
    x, gate = model.embed(b.items, b.time_buckets, b.mask, b.users, return_gate=True)
    assert gate.shape[-1] == len(model.feature_names)
    assert torch.allclose(gate.sum(-1), torch.ones_like(gate[..., 0]))
    scores = model.score(out.hidden[:, -1])
    assert scores.shape == (3, cycle_ds.log.num_items + 1) and torch.isinf(scores[:, 0]).all()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long), *(torch.zeros(1, 9, dtype=torch.long),) * 2,
              torch.ones(1, 9, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="unknown layers"):
        model(b.items, b.timestamps, b.time_buckets, b.mask, return_layers=("layers.7",))


def test_a_user_the_model_has_not_seen_is_scored_with_unknown_features(cycle_ds):
    """A cold-start user (row -1, or no users at all) takes the unknown code 0 of every user
    feature instead of failing; a known user is scored with its own codes."""
    torch.manual_seed(0)
    ages = np.arange(cycle_ds.log.num_users) % 3 + 1
    model = SPNN(
        SPNNConfig(num_items=cycle_ds.log.num_items, max_len=8, d_model=16, n_heads=2,
                   n_layers=1, dropout=0.0, user_feature_vocab={"age": 4}),
        user_features={"age": ages},
    ).eval()  # fmt: skip
    torch.nn.init.normal_(model.user_feat_emb["age"].weight)
    rows, ends = training_windows(cycle_ds.log, max_len=8)
    b = make_batch(cycle_ds.log, rows[:3], ends[:3], 8, 32)
    args = (b.items, b.timestamps, b.time_buckets, b.mask)
    unknown = model(*args, torch.full((3,), -1)).hidden
    torch.testing.assert_close(model(*args, None).hidden, unknown, rtol=0, atol=0)
    model.user_codes_age.zero_()  # every user's code set to unknown: the same output
    assert (ages > 0).all()  # the model holds a copy of the caller's codes, never the array
    torch.testing.assert_close(model(*args, b.users).hidden, unknown, rtol=0, atol=0)
    model.user_codes_age.copy_(torch.as_tensor(ages))
    assert not torch.allclose(model(*args, b.users).hidden, unknown)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="d_model"):
        SPNNConfig(num_items=5, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="detector layer"):
        SPNNConfig(num_items=5, n_layers=1, detector_layers=["layers.3"])


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("patience", 0, "an integer >= 1"),  # would train nothing and report untrained models
        ("epochs", 2.5, "an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
        ("lr", float("nan"), "a finite number > 0"),
        ("lr", 0.0, "a finite number > 0"),
        ("weight_decay", -1e-4, "a finite number >= 0"),
        ("grad_clip", 0.0, "None or a finite number > 0"),
        ("alpha", 1.5, r"a number in \[0, 1\]"),
        ("temperature", 0.0, "a finite number >= 1e-6"),
        ("feature_weight", float("inf"), "a finite number >= 0"),
        ("cut_prob", -0.1, r"a number in \[0, 1\]"),
        ("cut_max", 0, r"an integer >= cut_min \(1\)"),
        ("min_lr_ratio", 1.5, r"a number in \[0, 1\]"),
        ("warmup_epochs", -1.0, "a finite number >= 0"),
    ],
)
def test_train_config_checks_every_number(field, value, rule):
    with pytest.raises(ValueError, match=rf"TrainConfig.{field}=.* must be {rule}"):
        TrainConfig(**{field: value})
    # The experiment's config runs the same checks when it is built, before any training.
    if field in {f.name for f in dataclasses.fields(ExperimentConfig)}:
        with pytest.raises(ValueError, match=rf"TrainConfig.{field}="):
            ExperimentConfig(**{field: value})


def test_experiment_config_checks_seeds_dropout_and_device():
    cfg = ExperimentConfig(seeds=np.int64(2), dropout=np.float32(0.25), window_stride=np.int64(4))
    assert [type(v) for v in (cfg.seeds, cfg.dropout, cfg.window_stride)] == [int, float, int]
    json.dumps(cfg.to_dict())  # run.json holds it
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="seeds=.* must be an integer >= 1"):
            ExperimentConfig(seeds=bad)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be a number in \[0, 1\)"):
        ExperimentConfig(dropout=1.0)
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        ExperimentConfig(device="gpu")
    with pytest.raises(ValueError, match="the CPU is one device"):
        ExperimentConfig(device="cpu:5")
    with pytest.raises(ValueError, match="spnn_fast runs on 'cpu' or 'cuda'"):
        ExperimentConfig(device="meta")
    with pytest.raises(TypeError, match="device must be a str"):
        ExperimentConfig(device=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            ExperimentConfig(device="cuda")


@pytest.mark.parametrize("stride", [None, 2, 8, 50])
def test_an_epoch_trains_each_target_once_whatever_the_stride(cycle_ds, stride):
    torch.manual_seed(0)
    tr = Trainer(_tiny_model(cycle_ds), cycle_ds, TrainConfig(batch_size=4, window_stride=stride))
    assert tr.stride == min(stride or 8, 8)  # a stride of max_len or more: no overlap
    counts = []
    forward = tr.objective.forward

    def spy(b, *args):
        counts.append(int((b.targets > 0).sum()))
        return forward(b, *args)

    tr.objective.forward = spy
    tr.train_epoch(0)
    assert sum(counts) == int((np.diff(cycle_ds.log.offsets) - 3).sum())
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="window_stride"):
            TrainConfig(window_stride=bad)
        with pytest.raises(ValueError, match="window_stride"):  # before a run folder is written
            ExperimentConfig(window_stride=bad)
    assert TrainConfig(window_stride=np.int64(3)).window_stride == 3


def test_a_resumed_run_keeps_the_settings_it_was_saved_with(tmp_path):
    from spnn_fast.runfolder import write_run_config

    cfg = ExperimentConfig(window_stride=3, teacher_dropout=None)
    write_run_config(cfg, str(tmp_path))
    assert read_run_config(str(tmp_path)) == cfg
    assert read_run_config(str(tmp_path)).window_stride == 3
    assert read_run_config(str(tmp_path)).teacher_dropout is None
    # A None that stands for the common setting is the same run as the setting spelled out.
    assert cfg.differences(dataclasses.replace(cfg, teacher_dropout=cfg.dropout)) == []
    assert cfg.differences(dataclasses.replace(cfg, window_stride=None)) == ["window_stride"]
    # A run folder of another format is named, not half-read.
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"format": "spnn_fast.run/1", "config": {"extra": {}}}))
    with pytest.raises(ValueError, match=r"run.json is not a run of this spnn_fast \(format"):
        read_run_config(str(tmp_path))


def test_teacher_dropout_is_the_teachers_alone(cycle_ds):
    for flags, teacher, student in (([], 0.35, 0.2), (["--teacher-dropout", "None"], 0.2, 0.2),
                                    (["--teacher-dropout", "0.1", "--dropout", "0.3"], 0.1, 0.3)):  # fmt: skip
        mcfgs = _train_cli_config(*flags).model_configs(cycle_ds)
        assert mcfgs["teacher"].dropout == teacher
        assert mcfgs["student"].dropout == mcfgs["student_kd"].dropout == student
    with pytest.raises(
        ValueError,
        match=r"teacher_dropout=1.0 must be None \(the same as dropout\) or a number in",
    ):
        ExperimentConfig(teacher_dropout=1.0)


def test_model_overfits_a_tiny_log(cycle_ds):
    torch.manual_seed(0)
    model = _tiny_model(cycle_ds, d_model=32)
    tcfg = TrainConfig(epochs=60, batch_size=8, lr=1e-2, patience=60)
    res = Trainer(model, cycle_ds, tcfg, seed=0).fit()
    assert res["metrics"]["test"]["HR@5"] == 1.0
    # HR@1 = 1.0: the target is ranked first for every user.
    from spnn_fast.evaluation import evaluate
    from spnn_fast.protocol import eval_sets

    hr1 = evaluate(model, cycle_ds.log, eval_sets(cycle_ds.log)["test"], ks=(1,))["HR@1"]
    assert hr1 == 1.0


def test_lr_schedule():
    const = TrainConfig(epochs=10)
    assert [const.lr_factor(p) for p in (0.0, 3.3, 10.0)] == [1.0, 1.0, 1.0]
    cos = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2.0, min_lr_ratio=0.1)
    assert cos.lr_factor(0.0) < 0.01  # warmup starts near zero ...
    assert cos.lr_factor(1.0) == pytest.approx(0.5, abs=1e-3)  # ... rises linearly ...
    assert cos.lr_factor(2.0) == pytest.approx(1.0)  # ... to the peak, then decays
    assert cos.lr_factor(6.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos.lr_factor(10.0) == pytest.approx(0.1)
    assert cos.lr_factor(50.0) == pytest.approx(0.1)
    factors = [cos.lr_factor(p / 10) for p in range(20, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(schedule="cosine", min_lr_ratio=1.5)


def test_trainer_follows_the_schedule(cycle_ds):
    torch.manual_seed(0)
    tcfg = TrainConfig(epochs=4, batch_size=4, lr=1e-2, schedule="cosine", warmup_epochs=1.0)
    tr = Trainer(_tiny_model(cycle_ds), cycle_ds, tcfg, seed=0)
    n = -(-len(tr.windows[0]) // 4)
    seen = []
    step = tr.step
    tr.step = lambda *a: (seen.append(tr.optimizer.param_groups[0]["lr"]), step(*a))[1]
    tr.train_epoch(0)
    tr.train_epoch(2)
    expected = [1e-2 * tcfg.lr_factor(e + i / n) for e in (0, 2) for i in range(n)]
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_uninterrupted(cycle_ds, tmp_path, schedule):
    def trainer(kill_at=None):
        torch.manual_seed(3)
        model = _tiny_model(cycle_ds, dropout=0.1)
        tcfg = TrainConfig(epochs=4, batch_size=4, patience=10, cut_prob=0.5, cut_max=3,
                           schedule=schedule)  # fmt: skip
        tr = Trainer(model, cycle_ds, tcfg, seed=3)
        if kill_at is not None:
            train_epoch = tr.train_epoch

            def killed(epoch):
                if epoch == kill_at:
                    raise KeyboardInterrupt
                return train_epoch(epoch)

            tr.train_epoch = killed
        return tr

    full = trainer().fit(str(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        trainer(kill_at=2).fit(str(tmp_path / "cut"))  # killed during its 3rd epoch
    resumed_t = trainer()
    resumed = resumed_t.fit(str(tmp_path / "cut"))
    assert resumed["history"] == full["history"]
    assert resumed["metrics"] == full["metrics"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data_path, out_path, steps, die_rank, kd_cache_mb=None):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))  # fmt: skip
    try:
        _ddp_steps(rank, data_path, out_path, steps, die_rank, kd_cache_mb)
        # As the CLI does: the DDP objects (which hold the process group) are gone, and every
        # rank is done, before any rank tears gloo down.
        gc.collect()
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ddp_steps(rank, data_path, out_path, steps, die_rank, kd_cache_mb=None):
    ds = load(data_path)
    torch.manual_seed(0)
    model = _tiny_model(ds)
    # Overlapping windows: each rank drops the targets an older window holds (fresh_targets).
    tcfg = TrainConfig(batch_size=6, lr=5e-3, window_stride=3)
    teacher, teacher_rows = None, [0]
    if kd_cache_mb is not None:  # distillation, its teacher cached (or not, with 0)
        teacher = _tiny_model(ds, max_len=10, detector_layers=["layers.0"])
        tcfg = dataclasses.replace(tcfg, layer_pairs=[("layers.0", "layers.0")], cut_prob=0.5,
                                   cut_max=3, teacher_cache_mb=kd_cache_mb)  # fmt: skip
        original = teacher.forward

        def counting(*args, **kw):
            teacher_rows[0] += args[0].shape[0]
            return original(*args, **kw)

        teacher.forward = counting
    tr = Trainer(model, ds, tcfg, teacher=teacher, seed=0)
    for i, (idx, keep) in enumerate(tr._batches(0)):
        if i == steps:
            break
        if rank == die_rank and i == 1:
            os._exit(3)  # a rank that dies mid-training
        tr.step(idx, keep)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    if teacher is not None:
        with open(f"{out_path}.teacher_rows{rank}", "w") as f:
            f.write(str(teacher_rows[0]))


def _run_ddp(world, data_path, out_path, steps=3, die_rank=-1, timeout=90.0, kd_cache_mb=None):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker,
                         args=(r, world, port, data_path, out_path, steps, die_rank, kd_cache_mb))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    t0 = time.time()
    for p in procs:
        p.join(max(1.0, timeout - (time.time() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    return [p.exitcode for p in procs], alive, time.time() - t0


def test_two_processes_match_one_process(tmp_path):
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    codes1, _, _ = _run_ddp(1, data, str(tmp_path / "one.pt"))
    codes2, _, _ = _run_ddp(2, data, str(tmp_path / "two.pt"))
    assert codes1 == [0] and codes2 == [0, 0]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in one:
        # atol: the key bias gets a gradient that is zero up to rounding (softmax ignores a shift
        # shared by all keys) and Adam turns rounding noise into steps of up to ~lr * 1e-2.
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-4, msg=name)
    # The steps moved the parameters (the comparison is not between two untouched models).
    torch.manual_seed(0)
    fresh = _tiny_model(load(data)).state_dict()
    assert any(not torch.equal(fresh[k], one[k]) for k in one)


def test_two_processes_share_the_teacher_cache(tmp_path):
    """Distillation on 2 ranks: each rank runs the teacher on half the windows to build the
    cache, and training matches 2 ranks that run the teacher on every batch."""
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    out = {mb: str(tmp_path / f"kd{mb}.pt") for mb in (0, 1024)}
    for mb, path in out.items():
        codes, _, _ = _run_ddp(2, data, path, kd_cache_mb=mb)
        assert codes == [0, 0]
    cached, per_batch = torch.load(out[1024]), torch.load(out[0])
    for name in cached:
        torch.testing.assert_close(cached[name], per_batch[name], rtol=1e-6, atol=1e-7, msg=name)
    rows = [int(open(f"{out[1024]}.teacher_rows{r}").read()) for r in (0, 1)]
    n = len(Trainer(_tiny_model(load(data)), load(data), TrainConfig(window_stride=3)).windows[0])
    assert sorted(rows) == [n // 2, n - n // 2]  # each window once, shared by the ranks


def test_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    codes, alive, elapsed = _run_ddp(2, data, str(tmp_path / "x.pt"), steps=3, die_rank=1)
    assert not alive, "a rank hung after its peer died"
    assert codes[1] == 3 and codes[0] != 0
    assert elapsed < 90


def test_train_command_under_torchrun(tmp_path):
    # The whole job as users scale it out: every rank exits 0, rank 0 writes the report.
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "spnn_fast", "train", "--data", data, "--out", str(out), "--seeds", "1",
           "--epochs", "2", "--max-len", "8", "--teacher-d", "16", "--teacher-layers", "1",
           "--student-d", "4", "--student-layers", "1", "--batch-size", "8", "--threads", "1",
           "--window-stride", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == set(MODELS)
    for name in MODELS:
        assert (out / "seed0" / name / "best.pt").is_file()
        assert 0.0 <= report["models"][name]["metrics"]["all"]["NDCG@10"]["mean"] <= 1.0
    assert proc.stdout.count("report: ") == 1  # only rank 0 logs


def _tiny_experiment(data_path, **kw):
    cfg = dict(dataset=data_path, seeds=1, epochs=2, max_len=8, teacher_d=16, teacher_layers=1,
               teacher_heads=2, student_d=4, student_layers=1, student_heads=1, batch_size=8,
               patience=5, cut_max=3)  # fmt: skip
    cfg.update(kw)
    return ExperimentConfig(**cfg)


def test_pipeline_report_and_resume(tmp_path, monkeypatch):
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    full = run(_tiny_experiment(data, teacher_max_len=11), str(tmp_path / "full"),
               log=lambda *a: None)  # fmt: skip
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert set(report["models"]) == set(MODELS)
    for name in MODELS:
        m = report["models"][name]
        assert set(m["metrics"]) == {"all", "cold@3", "cold@5", "cold@10"}
        for split in m["metrics"].values():
            assert len(split) == 9
            assert all(set(v) == {"mean", "std", "se_users"} for v in split.values())
            # one user's metric is in [0, 1]: its standard error over the users is below 0.5
            assert all(0.0 <= v["se_users"] < 0.5 for v in split.values())
        assert m["params"] > 0
    assert report["models"]["student"]["params"] <= report["models"]["teacher"]["params"] / 4
    with pytest.raises(ValueError, match="1/4"):
        run(_tiny_experiment(data, student_d=16), str(tmp_path / "big"), log=lambda *a: None)
    assert not (tmp_path / "big").exists()  # refused before a run folder is written
    # A folder that holds a run is not reused with another configuration (its models would be
    # reported under the new one), nor is its run.json overwritten.
    saved = (tmp_path / "full" / "run.json").read_text()
    with pytest.raises(ValueError, match=r"holds a run with another configuration \(epochs, "
                                         r"student_d differ\); continue it with --resume"):  # fmt: skip
        run(_tiny_experiment(data, teacher_max_len=11, epochs=3, student_d=3),
            str(tmp_path / "full"), log=lambda *a: None)  # fmt: skip
    assert (tmp_path / "full" / "run.json").read_text() == saved
    more_seeds = _tiny_experiment(data, teacher_max_len=11, seeds=2)  # may grow: seed 0 is reused
    check_same_run(more_seeds, str(tmp_path / "full"))
    no_cache = _tiny_experiment(data, teacher_max_len=11, teacher_cache_mb=0)  # speed only
    check_same_run(no_cache, str(tmp_path / "full"))
    # A run saved on a GPU goes on here; a run whose teacher used the common dropout (None) is
    # the same run as one that names that dropout for its teacher.
    old = json.loads(saved)
    old["config"]["teacher_dropout"] = None
    old["config"]["device"] = "cuda:3"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps(old))
    same = _tiny_experiment(data, teacher_max_len=11, teacher_dropout=0.2)
    check_same_run(same, str(tmp_path / "old"))
    with pytest.raises(ValueError, match=r"\(teacher_dropout differ\)"):
        check_same_run(_tiny_experiment(data, teacher_max_len=11), str(tmp_path / "old"))
    assert "Sampling error" in (tmp_path / "full" / "report.md").read_text()
    assert (tmp_path / "full" / "report.png").stat().st_size > 0

    # Kill the run during the distilled student's second epoch, then resume it.
    calls = {"n": 0}
    original = Trainer.train_epoch

    def dying(self, epoch):
        if self.desc.endswith("student_kd") and epoch == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(_tiny_experiment(data, teacher_max_len=11), str(tmp_path / "cut"), log=lambda *a: None)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = run(_tiny_experiment(data, teacher_max_len=11), str(tmp_path / "cut"),
                  log=lambda *a: None)  # fmt: skip
    for name in MODELS:
        assert resumed["models"][name]["metrics"] == full["models"][name]["metrics"]
        assert resumed["models"][name]["history"] == full["models"][name]["history"]


def test_cli_train_and_eval(tmp_path, capsys):
    from spnn_fast.cli import main

    data = _write_cycle_csv(tmp_path / "cycle.csv")
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        data,
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--max-len",
        "8",
        "--teacher-d",
        "16",
        "--teacher-layers",
        "1",
        "--student-d",
        "4",
    ]
    assert main(args) == 0  # fmt: skip
    assert "student_kd" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(out / "seed0" / "student_kd" / "best.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"valid", "test", "cold@3", "cold@5", "cold@10"}
    assert main(["eval", str(tmp_path / "cycle.csv")]) == 2  # not a checkpoint: clean error
    assert "cycle.csv is damaged" in capsys.readouterr().err
    assert main(["eval", str(out / "seed0" / "teacher" / "best.pt"), "--device", "gpu"]) == 2
    assert "device='gpu' is not a device" in capsys.readouterr().err  # not "not a checkpoint"
    assert main(args[:-2] + ["--student-d", "4", "--threads", "-2"]) == 2
    assert "--threads must be in [1, " in capsys.readouterr().err
    assert main(args[:-2] + ["--student-d", "4", "--threads", "100000"]) == 2  # not started
    assert "(4 per CPU of this machine), got 100000" in capsys.readouterr().err
    assert main([*args, "--patience", "0"]) == 2  # checked before the folder's run is reused
    assert "TrainConfig.patience=0 must be an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--seeds", "2", "--lr", "0.1"]) == 2
    assert "--seeds, --lr would be ignored" in capsys.readouterr().err  # run.json decides
    assert main(["train", "--resume", str(out), "--threads", "1", "--teacher-cache-mb", "0"]) == 0
    assert "already done, reusing its result" in capsys.readouterr().out


def test_the_train_command_is_bitwise_reproducible(tmp_path):
    """Two processes run the whole job (teacher, student, distilled student) and save the same
    models to the last bit, with the CPU threads fixed as the command fixes them."""
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=9)
    flags = ["--data", data, "--seeds", "1", "--epochs", "2", "--max-len", "8", "--teacher-d",
             "16", "--teacher-layers", "1", "--student-d", "4", "--batch-size", "8",
             "--window-stride", "3", "--threads", "2"]  # fmt: skip
    # Other hash seeds, too: no result may hang on the order of a set of strings.
    for run_name, hash_seed in (("a", "1"), ("b", "2")):
        out = str(tmp_path / run_name)
        cmd = [sys.executable, "-m", "spnn_fast", "train", *flags, "--out", out]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in MODELS:
        a, b = (torch.load(tmp_path / r / "seed0" / name / "best.pt") for r in ("a", "b"))
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), (name, key)
        results = [json.loads((tmp_path / r / "seed0" / name / "result.json").read_text())
                   for r in ("a", "b")]  # fmt: skip
        assert results[0]["history"] == results[1]["history"], name
        assert results[0]["metrics"] == results[1]["metrics"], name


def test_fix_threads_turns_mkl_dynamic_threading_off():
    from spnn_fast._threads import fix_threads, mkl_dynamic

    before = torch.get_num_threads()
    assert fix_threads() == before
    assert mkl_dynamic() in (None, False)  # None: a torch without MKL
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        fix_threads(0)


def _experiment_module(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_teacher_sweep_trains_the_pipelines_teacher(tmp_path, capsys):
    # Hyperparameters are chosen from sweep runs: a sweep's teacher must be the main job's teacher.
    sweep = _experiment_module("sweep_teacher")
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    cfg = _tiny_experiment(data)
    run(cfg, str(tmp_path / "run"), log=lambda *a: None)
    result = json.loads((tmp_path / "run" / "seed0" / "teacher" / "result.json").read_text())
    overrides = {k: v for k, v in cfg.to_dict().items() if k != "seeds"}
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--seeds", "0", "--config", json.dumps(overrides), "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[0])
    for split in ("valid", "test", "cold@3"):
        assert row[f"{split}_NDCG@10"] == round(result["metrics"][split]["NDCG@10"], 5)
    assert row["best_epoch"] == result["best_epoch"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["mean"]["test_NDCG@10"] == row["test_NDCG@10"]
    for bad in ("[1]", "{not json", json.dumps({"dropout": 0.3})):
        with pytest.raises(SystemExit):
            sweep.main(["--config", bad])
    assert "--config" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_triton_matches_torch_path(tmp_path):
    """The whole pipeline on the GPU: the Triton kernels (attention, fused CE/KD, feature loss)
    train the three models along the same loss curves as the PyTorch path on the same GPU."""
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    runs = {}
    for backend in ("triton", "torch"):
        # head dims of 16, which the kernels take unpadded (the tiny default has 8 and 4)
        cfg = _tiny_experiment(data, teacher_max_len=11, epochs=3, dropout=0.0,
                               teacher_dropout=0.0, teacher_d=64,
                               teacher_heads=4, student_d=16, device="cuda", backend=backend)  # fmt: skip
        runs[backend] = run(cfg, str(tmp_path / backend), log=lambda *a: None)
    for name in MODELS:
        fast = [h["loss"] for h in runs["triton"]["models"][name]["history"][0]]
        slow = [h["loss"] for h in runs["torch"]["models"][name]["history"][0]]
        assert len(fast) == 3 and all(np.isfinite(fast))
        assert fast == pytest.approx(slow, rel=1e-3, abs=1e-4), name


@pytest.mark.parametrize("teacher_input", ["full", "cut"])
def test_teacher_reads_full_or_cut_windows(cycle_ds, teacher_input):
    """Distillation: the teacher reads its full window (privileged) or the student's cut input."""
    torch.manual_seed(0)
    teacher, student = _tiny_model(cycle_ds, max_len=10), _tiny_model(cycle_ds, max_len=8)
    # teacher_cache_mb=0: the teacher runs on every batch, so each of its inputs can be seen
    tcfg = TrainConfig(epochs=1, batch_size=4, cut_prob=1.0, cut_min=1, cut_max=2,
                       teacher_input=teacher_input, teacher_cache_mb=0)  # fmt: skip
    tr = Trainer(student, cycle_ds, tcfg, teacher=teacher, seed=0)
    seen = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        original = model.forward

        def spy(*args, _orig=original, _name=name, **kw):
            seen[_name].append(args[3].sum(1).tolist())  # real events per row
            return _orig(*args, **kw)

        model.forward = spy
    tr.train_epoch(0)
    assert seen["teacher"] and len(seen["teacher"]) == len(seen["student"])
    for t_rows, s_rows in zip(seen["teacher"], seen["student"]):
        assert all(s <= 2 for s in s_rows)  # every student window is cut to 1 or 2 events
        if teacher_input == "cut":
            assert t_rows == s_rows
        else:
            assert all(t >= s for t, s in zip(t_rows, s_rows)) and t_rows != s_rows
    with pytest.raises(ValueError, match="teacher_input"):
        TrainConfig(teacher_input="half")


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "teacher_max_len, rank, device",
    [(8, 0, "cpu"), (10, 0, "cpu"), (10, 1, "cpu"), pytest.param(10, 0, "cuda", marks=_CUDA)],
)
def test_cached_teacher_outputs_train_like_per_batch_teacher(
    cycle_ds, teacher_max_len, rank, device
):
    """With teacher_input="full" the teacher's outputs are computed once for every window; the
    distilled student trains as it does when the teacher runs on every batch (rank 1: the
    second of two ranks' share of each batch, without a process group; on a GPU up to rounding,
    as the cache's batches are not the training batches)."""
    params, calls = {}, {}
    for cache_mb in (0, 1024):
        torch.manual_seed(0)
        teacher = _tiny_model(cycle_ds, max_len=teacher_max_len, detector_layers=["layers.0"])
        student = _tiny_model(cycle_ds, max_len=8, dropout=0.1)
        tcfg = TrainConfig(epochs=2, batch_size=4, cut_prob=0.5, cut_min=1, cut_max=3,
                           window_stride=4, alpha=0.5, feature_weight=1.0,
                           layer_pairs=[("layers.0", "layers.0")], teacher_cache_mb=cache_mb,
                           eval_batch_size=5)  # fmt: skip
        tr = Trainer(student, cycle_ds, tcfg, teacher=teacher, seed=0, device=device)
        if rank:
            tr.rank, tr.size = rank, 2
        n = [0]
        original = teacher.forward

        def counting(*args, _orig=original, _n=n, **kw):
            _n[0] += 1
            return _orig(*args, **kw)

        teacher.forward = counting
        losses = [tr.train_epoch(e) for e in range(2)]
        params[cache_mb] = ([p.detach().clone() for p in student.parameters()], losses)
        calls[cache_mb] = n[0]
        assert (tr.teacher.cache() is None) == (cache_mb == 0)
    steps = 2 * math.ceil(len(tr.windows[0]) / 4)
    assert calls[0] == steps  # once per batch
    assert calls[1024] == math.ceil(len(tr.windows[0]) / 5)  # once per cache chunk
    tol = 1e-6 if device == "cpu" else 1e-4
    assert params[1024][1] == pytest.approx(params[0][1], rel=tol)
    for cached, per_batch in zip(params[1024][0], params[0][0]):
        torch.testing.assert_close(cached, per_batch, rtol=10 * tol, atol=tol)


def test_teacher_cache_respects_its_budget(cycle_ds):
    torch.manual_seed(0)
    teacher = _tiny_model(cycle_ds, detector_layers=["layers.0"])
    student = _tiny_model(cycle_ds)
    n = len(Trainer(student, cycle_ds, TrainConfig(), seed=0).windows[0])
    need = n * 8 * 16 * 2 * 4 / 2**20  # windows x L x d x (hidden + one layer) x fp32, in MiB
    for mb, cached in ((need * (1 - 1e-9), False), (need, True)):
        tcfg = TrainConfig(layer_pairs=[("layers.0", "layers.0")], teacher_cache_mb=mb)
        tr = Trainer(student, cycle_ds, tcfg, teacher=teacher, seed=0)
        cache = tr.teacher.cache()
        assert (cache is not None) == cached
        if cached:
            assert cache.hiddens[0].shape == (n, 8, 16)
            assert cache.layers["layers.0"].shape == (n, 8, 16)
    assert Trainer(student, cycle_ds, TrainConfig(), seed=0).teacher is None
    cut = TrainConfig(teacher_input="cut")
    assert Trainer(student, cycle_ds, cut, teacher=teacher, seed=0).teacher.cache() is None
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        TrainConfig(teacher_cache_mb=-1)


def test_a_teacher_reads_at_least_the_students_window(cycle_ds, tmp_path):
    short = _tiny_model(cycle_ds, max_len=6, detector_layers=["layers.0"])
    with pytest.raises(ValueError, match=r"teacher's max_len \(6\) must be >= the student's \(8\)"):
        Trainer(_tiny_model(cycle_ds), cycle_ds, TrainConfig(), teacher=short)
    with pytest.raises(ValueError, match=r"teacher_max_len=6 must be None \(= max_len\) or an "):
        _tiny_experiment(_write_cycle_csv(tmp_path / "cycle.csv"), teacher_max_len=6)


def test_teacher_cache_flag_reaches_the_distilled_student():
    for flag, want in (([], None), (["--teacher-cache-mb", "0"], 0.0),
                       (["--teacher-cache-mb", "None"], None)):  # fmt: skip
        assert _train_cli_config(*flag).train_configs()["student_kd"].teacher_cache_mb == want
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        _train_cli_config("--teacher-cache-mb", "-1")


def _train_cli_config(*flags):
    """The ExperimentConfig that ``spnn-fast train FLAGS`` builds."""
    import argparse

    from spnn_fast.cli import _run_config, _train_parser

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    return _run_config(parser.parse_args(["train", *flags]))[0]


def test_kd_teacher_input_reaches_the_distilled_student():
    for flag, want in (([], "full"), (["--kd-teacher-input", "cut"], "cut")):
        cfg = _train_cli_config(*flag)
        tcfgs = cfg.train_configs()
        assert cfg.kd_teacher_input == want and tcfgs["student_kd"].teacher_input == want
        assert tcfgs["teacher"].teacher_input == tcfgs["student"].teacher_input == "full"
    with pytest.raises(SystemExit):  # argparse refuses other values
        _train_cli_config("--kd-teacher-input", "half")


def test_window_stride_flag_reaches_every_model():
    for flag, want in (([], ExperimentConfig.window_stride), (["--window-stride", "3"], 3),
                       (["--window-stride", "None"], None)):  # fmt: skip
        tcfgs = _train_cli_config(*flag).train_configs()
        assert {t.window_stride for t in tcfgs.values()} == {want}
    with pytest.raises(ValueError, match="window_stride"):
        _train_cli_config("--window-stride", "-1").train_configs()


def test_shifted_eval_reads_a_run_and_shifts_only_the_inputs(tmp_path, capsys):
    shifted = _experiment_module("shifted_eval")
    data = _write_cycle_csv(tmp_path / "cycle.csv")
    run(_tiny_experiment(data), str(tmp_path / "run"), log=lambda *a: None)
    sets = shifted.splits(load(data).log)
    v, t = sets["valid"], sets["test"]
    # The test targets from the validation input; the validation targets from one event less.
    assert np.array_equal(sets["test_from_valid_input"].ends, v.ends)
    assert np.array_equal(sets["test_from_valid_input"].targets, t.targets)
    assert np.array_equal(sets["valid_from_shorter_input"].ends, v.ends - 1)
    assert np.array_equal(sets["valid_from_shorter_input"].targets, v.targets)
    shifted.main([str(tmp_path / "run")])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    for row in lines[: len(MODELS)]:
        path = tmp_path / "run" / "seed0" / row["model"] / "result.json"
        result = json.loads(path.read_text())
        for split in ("valid", "test"):
            assert row[split] == round(result["metrics"][split]["NDCG@10"], 5)
    assert [r["model"] for r in lines[len(MODELS) :]] == list(MODELS)


def test_paired_comparison_of_runs_pairs_by_seed(tmp_path, capsys):
    paired = _experiment_module("paired")
    rng = np.random.default_rng(0)
    runs, values = [tmp_path / "seed", tmp_path / "ensemble"], {}
    splits = ("valid", "test", "cold@3", "cold@5", "cold@10")
    for r, run_dir in enumerate(runs):
        for seed in (0, 1, 2, 5):  # a seed the second run lacks is left out of the pairs
            if r == 1 and seed == 5:
                continue
            for model in ("teacher", "student", "student_kd"):
                v = float(rng.uniform(0.05, 0.08))
                values[r, seed, model] = v
                metrics = {s: {"NDCG@10": v, "HR@10": 2 * v} for s in splits}
                d = run_dir / f"seed{seed}" / model
                d.mkdir(parents=True)
                (d / "result.json").write_text(json.dumps({"metrics": metrics}))
    (runs[1] / "ensemble").mkdir()
    ens = {s: {"NDCG@10": 0.07, "HR@10": 0.14} for s in splits}
    (runs[1] / "ensemble" / "result.json").write_text(json.dumps({"metrics": ens}))
    out = tmp_path / "paired.jsonl"
    paired.main([str(runs[0]), str(runs[1]), "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 * len(splits) * 2 and "cold@5" in capsys.readouterr().out

    def expect(comparison, new, base, seeds):
        (row,) = [
            r
            for r in rows
            if r["comparison"] == comparison and (r["split"], r["metric"]) == ("cold@5", "NDCG@10")
        ]
        d = np.array([new(s) - base(s) for s in seeds])
        assert row["seeds"] == list(seeds)
        assert row["diff"] == pytest.approx(d.mean())
        assert row["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
        assert row["ratio"] == pytest.approx(
            np.mean([new(s) for s in seeds]) / np.mean([base(s) for s in seeds])
        )

    expect(
        "seed: student_kd vs student",
        lambda s: values[0, s, "student_kd"],
        lambda s: values[0, s, "student"],
        (0, 1, 2, 5),
    )
    expect(
        "ensemble vs seed: student_kd",
        lambda s: values[1, s, "student_kd"],
        lambda s: values[0, s, "student_kd"],
        (0, 1, 2),
    )
    expect(
        "ensemble: teacher_ensemble vs teacher",
        lambda s: 0.07,
        lambda s: values[1, s, "teacher"],
        (0, 1, 2),
    )
    with pytest.raises(ValueError, match="two seeds in common"):
        paired.paired({0: ens}, {0: ens}, "test", "NDCG@10")


def test_every_setting_of_the_run_is_a_train_flag(capsys):
    """The train command's flags are generated from ExperimentConfig: one per field, with the
    field's help and default, and None spelled as such for the Optional ones."""
    from spnn_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"(default: {f.default})" in " ".join(text.split()), f.name
    assert _train_cli_config("--teacher-max-len", "None").teacher_max_len is None
    assert _train_cli_config("--no-use-side-features").use_side_features is False


def test_teacher_cache_budget_from_free_memory_and_its_log_line(cycle_ds, monkeypatch):
    """teacher_cache_mb None: a quarter of the memory available on the device (shared by the
    processes of one machine); one log line says whether the teacher is cached and why."""
    import spnn_fast.teacher as T

    assert T.available_memory(torch.device("cpu")) > 0
    teacher = _tiny_model(cycle_ds, detector_layers=["layers.0"])
    student = _tiny_model(cycle_ds)
    n = len(Trainer(student, cycle_ds, TrainConfig(), seed=0).windows[0])
    need = n * 8 * 16 * 2 * 4  # windows x L x d x (hidden + one layer) x fp32 bytes
    tcfg = TrainConfig(layer_pairs=[("layers.0", "layers.0")])
    assert tcfg.teacher_cache_mb is None
    for free, local, cached in ((4 * need, "1", True), (4 * need - 4, "1", False),
                                (8 * need, "2", True), (8 * need - 8, "2", False)):  # fmt: skip
        monkeypatch.setattr(T, "available_memory", lambda device, free=free: free)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        tr = Trainer(student, cycle_ds, tcfg, teacher=teacher, seed=0)
        assert tr.teacher.cached == cached, (free, local)
        assert ("cached" in tr.teacher.note) == cached and "0.25 of the" in tr.teacher.note
        assert ("shared by 2 processes" in tr.teacher.note) == (local == "2")
    monkeypatch.setattr(T, "available_memory", lambda device: None)
    tr = Trainer(student, cycle_ds, tcfg, teacher=teacher, seed=0)
    assert not tr.teacher.cached and "cannot be read; set teacher_cache_mb" in tr.teacher.note
    cut = dataclasses.replace(tcfg, teacher_input="cut")
    note = Trainer(student, cycle_ds, cut, teacher=teacher, seed=0).teacher.note
    assert note.startswith("the teacher runs on every batch: it reads the student's own cut")
    lines = []
    small = dataclasses.replace(tcfg, epochs=1, teacher_cache_mb=0)
    Trainer(student, cycle_ds, small, teacher=teacher, seed=0).fit(log=lines.append)
    assert any("over the 0 MiB allowed (teacher_cache_mb=0" in x for x in lines), lines


def test_step_speed_times_both_installs(tmp_path, capsys):
    speed = _experiment_module("step_speed")
    data = _write_cycle_csv(tmp_path / "cycle.csv", users=12, length=20)
    speed.main(["--base", sys.executable, "--new", sys.executable, "--data", data, "--rounds", "1",
                "--warm", "1", "--steps", "1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base_steps_per_s"] > 0 and out["new_steps_per_s"] > 0
    assert out["ratio"] == out["new_steps_per_s"] / out["base_steps_per_s"]
