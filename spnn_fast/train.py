"""The trainer: one model, trained with early stopping on validation NDCG@10.

Training windows come from :mod:`spnn_fast.windows`; a student can be shown cold-start-like
inputs (each window cut, with some probability, to its k most recent events). With a
``teacher`` the student is distilled from it (:mod:`spnn_fast.objective`): the teacher reads the
full window with the same end (``TrainConfig.teacher_input="full"``, privileged) or the student's
own input (``"cut"``), through :class:`spnn_fast.teacher.TeacherOutputs`.

Runs unchanged under ``torchrun`` with DistributedDataParallel: each global batch is split across
ranks, losses are normalised by global counts (so N processes take the same steps as one process
with the same global batch), metrics are summed across ranks, and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from spnn_fast._io import atomic_write, load_checkpoint_file
from spnn_fast.config import SAMPLED_ABOVE, TrainConfig
from spnn_fast.data import Dataset
from spnn_fast.distributed import world
from spnn_fast.encode import SequenceBatch
from spnn_fast.evaluation import evaluate
from spnn_fast.model import SPNN
from spnn_fast.objective import Objective
from spnn_fast.protocol import eval_sets, train_ends, train_log
from spnn_fast.sampling import NegativeSampler
from spnn_fast.teacher import TeacherOutputs
from spnn_fast.windows import fresh_targets, make_batch, training_windows

__all__ = ["Trainer"]


class Trainer:
    """Trains one model with early stopping on validation NDCG@10, checkpointing every epoch.

    Args:
        model: the model to train (moved to ``device``).
        dataset: the data (its log is split leave-one-out).
        tcfg: the training configuration.
        teacher: a trained teacher to distil from (frozen), or None for plain CE training.
        ensemble: the teachers of the logit term when it learns from an ensemble (frozen; the
            ``teacher`` among them, whose layers the feature term reads), combined as
            ``tcfg.ensemble`` says; None: the teacher alone.
        seed: seeds window shuffles, cuts and dropout (per epoch, so a resumed run repeats an
            uninterrupted one); the model's initialisation is the caller's.
        device: where to train.
        progress: show a progress bar (rank 0 only).
        desc: the progress bar's label.
    """

    def __init__(
        self,
        model: SPNN,
        dataset: Dataset,
        tcfg: TrainConfig,
        *,
        teacher: Optional[SPNN] = None,
        ensemble: Optional[Sequence[SPNN]] = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        desc: str = "train",
    ) -> None:
        self.device = torch.device(device)
        self.dataset, self.log, self.tcfg, self.seed = dataset, dataset.log, tcfg, seed
        self.model = model.to(self.device)
        L = model.config.max_len
        if ensemble is not None and (teacher is None or not any(t is teacher for t in ensemble)):
            raise ValueError("ensemble must hold the teacher (whose layers the distillers read)")
        teachers = list(ensemble) if ensemble is not None else [teacher] if teacher else []
        for t in teachers:
            if t.config.max_len < L:
                raise ValueError(
                    f"the teacher's max_len ({t.config.max_len}) must be >= the student's "
                    f"({L}): it reads at least the student's window"
                )
            t.to(self.device).eval().requires_grad_(False)
        self.train_end = train_ends(self.log)
        self.sampler: Optional[NegativeSampler] = None
        log_q = None
        if tcfg.sampled(model.config.num_items):
            counts = None
            if tcfg.sampling == "popularity":  # the items' counts among the training events
                counts = torch.from_numpy(item_counts(train_log(self.log)))
            self.sampler = NegativeSampler(model.config.num_items + 1, counts, padding_idx=0)
            log_q = None if counts is None else self.sampler.log_q
        self.loss_note = loss_note(tcfg, model.config.num_items)
        self._neg_gen = torch.Generator().manual_seed(seed * 100_003 + 2**40)
        self.objective = Objective(self.model, tcfg, teacher, ensemble, log_q).to(self.device)
        self.rank, self.size = world()
        self.step_module: nn.Module = self.objective
        if tcfg.compile:  # the objective keeps static shapes (spnn_fast.objective)
            # One graph per model and batch shape (a job trains several models, each with a
            # shorter last batch): more than dynamo's default limit, which fullgraph makes fatal.
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 256))
            self.step_module = torch.compile(self.objective, fullgraph=True, dynamic=False)
        if self.size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        # The fused AdamW: one pass over each parameter instead of about ten (on the CPU about
        # 9x faster over a 500k-item table, where the step's other work is small).
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                           fused=fused)  # fmt: skip
        # A stride of max_len or more: windows that do not overlap.
        self.stride = min(tcfg.window_stride or L, L)
        self.windows = training_windows(self.log, L, self.stride)
        self.splits = eval_sets(self.log)
        # Batches as long as the longer of the student's and the teacher's windows (the teacher
        # sees up to its own max_len events before each window end).
        self.batch_len = max([L] + [t.config.max_len for t in teachers])
        self.teacher: Optional[TeacherOutputs] = None
        if teacher is not None:
            own = next(i for i, t in enumerate(teachers) if t is teacher)
            self.teacher = TeacherOutputs(teachers, own, self.objective.teacher_layers, tcfg,
                                          self.windows, L, self._batch, self.device)  # fmt: skip
        self.progress, self.desc = progress and self.rank == 0, desc
        self.history: List[Dict] = []
        self.epoch = 0
        self.best = {"ndcg": -1.0, "epoch": -1, "state": None}
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.windows_seen = 0

    # ---------------------------------------------------------------- one step
    def _batches(self, epoch: int):
        """(indices into ``windows``, events kept per window) of each global batch of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.windows[0]))
        B = self.tcfg.batch_size
        for s in range(0, len(order), B):
            idx = order[s : s + B]
            keep = np.full(len(idx), self.model.config.max_len, dtype=np.int64)
            cut = rng.random(len(idx)) < self.tcfg.cut_prob
            keep[cut] = rng.integers(self.tcfg.cut_min, self.tcfg.cut_max + 1, size=int(cut.sum()))
            yield idx, keep

    def _batch(self, rows: np.ndarray, ends: np.ndarray) -> SequenceBatch:
        return make_batch(self.log, rows, ends, self.batch_len, self.model.config.num_time_buckets,
                          self.train_end).to(self.device)  # fmt: skip

    def step(self, idx: np.ndarray, keep: np.ndarray) -> Dict[str, float]:
        """One optimizer step on a global batch: the windows ``windows[idx]``, window ``i`` cut
        to its last ``keep[i]`` events (this rank takes its share)."""
        L = self.model.config.max_len
        local = idx[self.rank :: self.size]
        rows, ends = (a[local] for a in self.windows)
        keep = torch.as_tensor(keep[self.rank :: self.size], device=self.device)
        full = self._batch(rows, ends)
        b = full.tail(L)
        fresh = fresh_targets(b.targets, ends, L, self.stride, b.ignore_index)
        b = dataclasses.replace(b, targets=fresh).cut(keep)
        t_view = self.teacher.view(local, full, keep) if self.teacher is not None else None
        norm = self.objective.normalizers(b, self.device)
        negatives = None
        if self.sampler is not None:  # every rank draws the same ones
            negatives = self.sampler.sample(self.tcfg.negatives, self._neg_gen).to(self.device)
        loss, stats = self.step_module(b, norm, t_view, negatives)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; the losses are normalised by global counts, so
        # scale by the world size to make the average a sum.
        (loss * self.size).backward()
        if self.tcfg.grad_clip:
            nn.utils.clip_grad_norm_(self.objective.parameters(), self.tcfg.grad_clip)
        self.optimizer.step()
        return {"loss": float(loss.detach()) * self.size, **{k: float(v) for k, v in stats.items()}}

    # ---------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(self.seed * 100_003 + epoch)  # dropout: a function of (seed, epoch)
        # the sampled loss's negatives: a function of (seed, epoch) too, apart from dropout's
        self._neg_gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 2**40)
        self.model.train()
        n_batches = math.ceil(len(self.windows[0]) / self.tcfg.batch_size)
        total, t0 = 0.0, time.perf_counter()
        bar = _bar(n_batches, f"{self.desc} ep {epoch + 1}", self.progress)
        try:
            for i, (idx, keep) in enumerate(self._batches(epoch)):
                # The rate is a function of (epoch, step): a resumed run follows the same schedule.
                lr = self.tcfg.lr * self.tcfg.lr_factor(epoch + i / n_batches)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                stats = self.step(idx, keep)
                total += stats["loss"]
                self.windows_seen += len(idx)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
        finally:  # also on Ctrl-C: the bar's line is cleared before the command says more
            if bar is not None:
                bar.close()
        self.train_seconds += time.perf_counter() - t0
        return total / max(n_batches, 1)

    def evaluate(self, split: str, with_se: bool = False):
        return evaluate(self.model, self.log, self.splits[split], with_se=with_se,
                        batch_size=self.tcfg.eval_batch_size, device=self.device)  # fmt: skip

    def fit(self, ckpt_dir: Optional[str] = None, *, log: Callable[[str], None] = print) -> Dict:
        """Train until ``epochs`` or early stopping; resumes from ``ckpt_dir/last.pt`` if there.

        Returns ``{"metrics": {split: {metric: value}}, "standard_errors": {split: {metric: se over
        users}}, "history": [...], "best_epoch", ...}`` with every split evaluated on the model of
        the best validation epoch.
        """
        last_path = os.path.join(ckpt_dir, "last.pt") if ckpt_dir else None
        if last_path and os.path.exists(last_path):
            self._load(
                load_checkpoint_file(
                    last_path,
                    self.device,
                    _STATE_KEYS,
                    recover="delete it to train this model again from its first epoch",
                )
            )
            log(f"{self.desc}: resumed after epoch {self.epoch}")
        if self.rank == 0:
            log(f"{self.desc}: {self.loss_note}")
        if self.teacher is not None and self.rank == 0:
            log(f"{self.desc}: {self.teacher.note}")
        while self.epoch < self.tcfg.epochs and self.bad_epochs < self.tcfg.patience:
            self._fit_epoch(log)
            if last_path and self.rank == 0:
                os.makedirs(ckpt_dir, exist_ok=True)
                atomic_write(last_path, lambda f: torch.save(self._state(), f))
            if self.size > 1:
                dist.barrier()
        if self.best["state"] is not None:
            self.model.load_state_dict(self.best["state"])
        final = {s: self.evaluate(s, with_se=True) for s in self.splits if s != "valid"}
        final["valid"] = self.evaluate("valid", with_se=True)
        return {
            "metrics": {s: m for s, (m, _) in final.items()},
            "standard_errors": {s: se for s, (_, se) in final.items()},
            "history": self.history,
            "best_epoch": self.best["epoch"],
            "epochs_run": self.epoch,
            "train_seconds": self.train_seconds,
            "windows_per_second": self.windows_seen / max(self.train_seconds, 1e-9),
            "params": self.model.num_parameters(),
        }

    def _fit_epoch(self, log: Callable[[str], None]) -> None:
        """One epoch, its validation, and the early-stopping bookkeeping."""
        loss = self.train_epoch(self.epoch)
        valid = self.evaluate("valid")
        ndcg = valid["NDCG@10"]
        self.history.append({"epoch": self.epoch + 1, "loss": loss, "valid_NDCG@10": ndcg,
                             "valid_HR@10": valid["HR@10"]})  # fmt: skip
        if ndcg > self.best["ndcg"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"ndcg": ndcg, "epoch": self.epoch + 1, "state": state}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch += 1
        if self.progress:
            log(f"{self.desc} epoch {self.epoch}: loss {loss:.4f}  valid NDCG@10 {ndcg:.4f}"
                f"  (best {self.best['ndcg']:.4f} @ {self.best['epoch']})")  # fmt: skip

    def _state(self) -> Dict:
        return {
            "epoch": self.epoch,
            "objective": self.objective.state_dict(),  # the model's state is inside
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "windows_seen": self.windows_seen,
            "seed": self.seed,
        }

    def _load(self, st: Dict) -> None:
        if st["seed"] != self.seed:
            raise ValueError(f"checkpoint seed {st['seed']} differs from this run's {self.seed}")
        self.objective.load_state_dict(st["objective"])
        self.optimizer.load_state_dict(st["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint of an unfused AdamW says None
            group["fused"] = self.optimizer.defaults["fused"]
        self.epoch, self.history, self.best = st["epoch"], st["history"], st["best"]
        self.bad_epochs, self.train_seconds = st["bad_epochs"], st["train_seconds"]
        self.windows_seen = st["windows_seen"]


# The keys of a trainer's last.pt (what _load reads).
_STATE_KEYS = ("epoch", "objective", "optimizer", "history", "best", "bad_epochs",
               "train_seconds", "windows_seen", "seed")  # fmt: skip


def item_counts(log) -> np.ndarray:
    """int64 ``[V + 1]``: how often each item id occurs in ``log`` (0 for the padding id)."""
    return np.bincount(np.asarray(log.items), minlength=log.num_items + 1).astype(np.int64)


def loss_note(tcfg: TrainConfig, num_items: int) -> str:
    """One line: the loss a model of ``num_items`` items trains with, and why."""
    why = f"loss={tcfg.loss}"
    if tcfg.loss == "auto":
        side = ">" if tcfg.sampled(num_items) else "<="
        why = f"auto: {num_items:,} items {side} {SAMPLED_ABOVE:,}"
    if tcfg.sampled(num_items):
        return (f"loss: sampled softmax, {tcfg.negatives:,} negatives per step drawn by "
                f"{tcfg.sampling} ({why})")  # fmt: skip
    return f"loss: full cross-entropy over the {num_items:,} items ({why})"


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
