"""The training step's loss (spnn_fast.objective): every position of the batch takes part, those
without a target through ignore_index, so the step keeps static shapes; it equals the loss over
the selected positions, and torch.compile(fullgraph=True) takes it whole without recompiling for
batches that differ only in their targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _utils import assert_close

from spnn_fast.config import ExperimentConfig
from spnn_fast.data import Dataset
from spnn_fast.functional import distillation_loss
from spnn_fast.log import InteractionLog
from spnn_fast.model import SPNN
from spnn_fast.objective import Objective, detector_targets
from spnn_fast.teacher import teacher_view
from spnn_fast.windows import make_batch, training_windows


def _dataset(users=40, items=60, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 30, users)
    user = np.repeat(np.arange(users), lengths)
    item = rng.integers(1, items + 1, len(user))
    time = np.concatenate([np.sort(rng.integers(0, 10**7, n)) for n in lengths])
    log = InteractionLog(user, item, time)
    genre = rng.integers(0, 5, (log.num_items + 1, 2))
    genre[0] = 0
    return Dataset("tiny", log, item_features={"genre": genre},
                   user_features={"age": rng.integers(1, 4, log.num_users)},
                   feature_vocab={"genre": 5, "age": 4})  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    ds = _dataset()
    cfg = ExperimentConfig(max_len=8, teacher_d=16, student_d=8, teacher_heads=2,
                           student_heads=2, dropout=0.0, teacher_dropout=0.0)  # fmt: skip
    mcfgs, tcfgs = cfg.model_configs(ds), cfg.train_configs()
    torch.manual_seed(0)
    models = {n: SPNN(c, ds.item_features, ds.user_features) for n, c in mcfgs.items()}
    rows, ends = training_windows(ds.log, 8, 3)
    return ds, models, tcfgs, rows, ends


def _batch(ds, rows, ends, keep=None):
    b = make_batch(ds.log, rows, ends, 8, 32)
    return b if keep is None else b.cut(torch.as_tensor(keep))


def _selected_loss(obj: Objective, b, t_view):
    """The loss written with a boolean selection of the positions that have a target."""
    model, tcfg, teacher = obj.model, obj.tcfg, obj.teacher
    out = model(b.items, b.timestamps, b.time_buckets, b.mask, b.users,
                return_layers=obj.student_layers + tuple(model.config.detector_layers))  # fmt: skip
    sel = b.targets > 0
    y = b.targets[sel] - 1
    if teacher is None:
        loss = distillation_loss(out.hidden[sel], model.item_table(), target=y, alpha=0.0,
                                 reduction="sum")  # fmt: skip
    else:
        t_h, t_layers = t_view
        loss = distillation_loss(out.hidden[sel], model.item_table(), t_h[0][sel],
                                 teacher.item_table(), y, temperature=tcfg.temperature,
                                 alpha=tcfg.alpha, reduction="sum")  # fmt: skip
        for s_layer, t_layer in tcfg.layer_pairs:
            name = f"{s_layer}->{t_layer}".replace(".", "_")
            loss = loss + tcfg.feature_weight * obj.distillers[name](
                out.layers[s_layer], t_layers[t_layer], b.mask
            )
    for layer in model.config.detector_layers:
        mask, yd, ok = detector_targets(b)
        pooled = model.detector(layer).pool(out.layers[layer].detach()[ok], mask[ok])
        loss = loss + tcfg.detector_weight * distillation_loss(
            pooled, model.item_table().detach(), target=yd[ok] - 1, alpha=0.0, reduction="sum"
        )
    return loss


@pytest.mark.parametrize("name", ["teacher", "student", "student_kd"])
def test_static_loss_equals_the_selected_one(setup, name):
    ds, models, tcfgs, rows, ends = setup
    teacher = models["teacher"] if name == "student_kd" else None
    obj = Objective(models[name], tcfgs[name], teacher)
    b = _batch(ds, rows[:24], ends[:24], keep=np.r_[np.full(12, 8), np.arange(12) % 5])
    assert bool((b.targets == -100).any()) and bool((b.targets > 0).any())
    t_view = teacher_view([teacher], 0, b, 8, obj.teacher_layers) if teacher is not None else None
    norm = {k: torch.tensor(v) for k, v in (("targets", 1.0), ("rows", b.batch_size), ("aux", 1.0))}
    got, _ = obj(b, norm, t_view)
    want = _selected_loss(obj, b, t_view)
    named = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    assert_close(got, want, "loss", rtol=1e-5)
    for (n, _), a, e in zip(named, g_got, g_want):
        assert (a is None) == (e is None), n
        if a is not None:
            assert_close(a, e, n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["teacher", "student_kd"])
def test_the_step_compiles_whole_and_once(setup, name):
    """fullgraph=True: no graph break; batches of one shape whose targets differ (other cuts,
    other windows) reuse the first graph (error_on_recompile)."""
    ds, models, tcfgs, rows, ends = setup
    teacher = models["teacher"] if name == "student_kd" else None
    obj = Objective(models[name], tcfgs[name], teacher)
    compiled = torch.compile(obj, fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    try:
        for i, keep in enumerate([np.full(16, 8), np.arange(16) % 6, np.ones(16, np.int64)]):
            b = _batch(ds, rows[16 * i : 16 * i + 16], ends[16 * i : 16 * i + 16], keep)
            norm = obj.normalizers(b, torch.device("cpu"))  # other counts in each batch
            t_view = (teacher_view([teacher], 0, b, 8, obj.teacher_layers)
                      if teacher is not None else None)  # fmt: skip
            want, _ = obj(b, norm, t_view)
            got, _ = compiled(b, norm, t_view)
            got.backward()
            assert_close(got, want, "loss", rtol=1e-5)
            if i == 0:
                torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_norm_counts_the_targets(setup):
    ds, models, tcfgs, rows, ends = setup
    obj = Objective(models["student"], dataclasses.replace(tcfgs["student"]), None)
    b = _batch(ds, rows[:10], ends[:10], keep=np.arange(10) % 4)
    norm = obj.normalizers(b, torch.device("cpu"))
    assert float(norm["targets"]) == float((b.targets > 0).sum()) and float(norm["rows"]) == 10.0
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in norm.values())


def test_trainer_compile_setting_trains_the_same_steps(setup, monkeypatch):
    """TrainConfig.compile (spnn-fast train --compile) compiles the step whole; its losses are
    the eager ones to float tolerance (aot_eager here: the graph, not Inductor's code, is what
    the test is about)."""
    import functools

    from spnn_fast.train import Trainer

    ds, models, tcfgs, _, _ = setup
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(3)
        model = SPNN(models["student"].config, ds.item_features, ds.user_features)
        tcfg = dataclasses.replace(tcfgs["student"], compile=compiled, batch_size=16)
        with monkeypatch.context() as m:
            m.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
            trainer = Trainer(model, ds, tcfg, seed=0)
        assert isinstance(trainer.step_module, torch._dynamo.eval_frame.OptimizedModule) == compiled
        losses[compiled] = [trainer.step(idx, keep)["loss"]
                            for idx, keep in list(trainer._batches(0))[:3]]  # fmt: skip
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def _all_items(ds) -> torch.Tensor:
    return torch.arange(1, ds.log.num_items + 1)


@pytest.mark.parametrize("name", ["teacher", "student", "student_kd"])
def test_sampled_loss_over_every_item_is_the_full_loss(setup, name):
    """With every item once as a negative, uniform (no logQ), the target's own draw removed as an
    accidental hit, each row's candidates are the whole catalogue: the sampled objective is the
    full one, the distillation and detector terms included."""
    ds, models, tcfgs, rows, ends = setup
    teacher = models["teacher"] if name == "student_kd" else None
    full = Objective(models[name], dataclasses.replace(tcfgs[name], loss="full"), teacher)
    sampled = Objective(models[name], dataclasses.replace(tcfgs[name], loss="sampled"), teacher)
    sampled.load_state_dict(full.state_dict())  # the same distillers' projections
    assert sampled.sampled and not full.sampled
    b = _batch(ds, rows[:20], ends[:20], keep=np.r_[np.full(10, 8), np.arange(10) % 5])
    t_view = teacher_view([teacher], 0, b, 8, full.teacher_layers) if teacher is not None else None
    norm = full.normalizers(b, torch.device("cpu"))
    want, want_parts = full(b, norm, t_view)
    got, got_parts = sampled(b, norm, t_view, _all_items(ds))
    assert_close(got, want, "loss", rtol=1e-5)
    assert set(got_parts) == set(want_parts)
    for k in want_parts:
        assert_close(got_parts[k], want_parts[k], k, rtol=1e-5)


def test_sampled_ensemble_learns_from_the_mean_logits(setup):
    ds, models, tcfgs, rows, ends = setup
    torch.manual_seed(5)
    other = SPNN(models["teacher"].config, ds.item_features, ds.user_features)
    teachers = [models["teacher"], other]
    kw = dict(teacher=models["teacher"], ensemble=teachers)
    tcfg = dataclasses.replace(tcfgs["student_kd"], ensemble="logits")
    full = Objective(models["student_kd"], dataclasses.replace(tcfg, loss="full"), **kw)
    sampled = Objective(models["student_kd"], dataclasses.replace(tcfg, loss="sampled"), **kw)
    sampled.load_state_dict(full.state_dict())
    b = _batch(ds, rows[:12], ends[:12])
    t_view = teacher_view(teachers, 0, b, 8, full.teacher_layers)
    norm = full.normalizers(b, torch.device("cpu"))
    want, _ = full(b, norm, t_view)
    got, _ = sampled(b, norm, t_view, _all_items(ds))
    assert_close(got, want, "loss", rtol=1e-5)
    with pytest.raises(ValueError, match="mean logits .*ensemble='logits'"):
        Objective(models["student_kd"], dataclasses.replace(tcfg, loss="sampled",
                  ensemble="distributions"), **kw)  # fmt: skip


def test_trainer_draws_negatives_and_says_which_loss(setup, monkeypatch):
    import spnn_fast.trainconfig as TC
    from spnn_fast.train import Trainer

    ds, models, tcfgs, _, _ = setup
    V = ds.log.num_items
    tcfg = dataclasses.replace(tcfgs["teacher"], batch_size=16, negatives=7)
    tr = Trainer(models["teacher"], ds, tcfg, seed=0)
    assert tr.sampler is None and tr.loss_note.startswith("loss: full cross-entropy over the")
    assert f"auto: {V:,} items <= 20,000" in tr.loss_note
    monkeypatch.setattr(TC, "SAMPLED_ABOVE", V - 1)
    tr = Trainer(models["teacher"], ds, tcfg, seed=0)
    assert tr.sampler is not None and tr.objective.log_q is not None
    assert "sampled softmax, 7 negatives per step drawn by popularity" in tr.loss_note
    counts = np.bincount(
        np.concatenate([ds.log.items[ds.log.offsets[u] : ds.log.offsets[u] + e]
                        for u, e in enumerate(tr.train_end)]), minlength=V + 1)  # fmt: skip
    probs = tr.sampler.probs.numpy()
    np.testing.assert_allclose(probs, counts / counts.sum())  # training events only
    drawn = []
    real = tr.sampler.sample
    monkeypatch.setattr(tr.sampler, "sample", lambda k, g: drawn.append(real(k, g)) or drawn[-1])
    losses = [tr.step(idx, keep)["loss"] for idx, keep in list(tr._batches(0))[:3]]
    assert np.isfinite(losses).all() and len(drawn) == 3
    assert all(d.shape == (7,) and int(d.min()) >= 1 and int(d.max()) <= V for d in drawn)
    uniform = Trainer(models["teacher"], ds, dataclasses.replace(tcfg, sampling="uniform"), seed=0)
    assert uniform.objective.log_q is None and "drawn by uniform" in uniform.loss_note


def test_a_resumed_trainer_keeps_the_fused_optimizer(setup, tmp_path):
    """A checkpoint of an unfused AdamW (an older spnn_fast) loads into the fused one and stays
    fused (load_state_dict would copy its fused=None over)."""
    from spnn_fast.train import Trainer

    ds, models, tcfgs, _, _ = setup
    tr = Trainer(models["student"], ds, dataclasses.replace(tcfgs["student"], batch_size=16))
    tr.step(*next(iter(tr._batches(0))))
    state = tr._state()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    again = Trainer(models["student"], ds, dataclasses.replace(tcfgs["student"], batch_size=16))
    again._load(state)
    assert all(g["fused"] is True for g in again.optimizer.param_groups)
    again.step(*next(iter(again._batches(0))))
