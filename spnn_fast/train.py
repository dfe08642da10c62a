"""Training and evaluation of SPNN models: plain next-item CE, and distillation from a teacher.

Training windows come from :func:`spnn_fast.encode_batch` over each user's training events
(``[0, n-2)``, see :mod:`spnn_fast.protocol`): the events are cut into windows of ``max_len``
ending at ``n-2, n-2-L, ...``, and every position of every window is trained (its target is the
next event), except a target that would be the validation event. A student can be shown
cold-start-like inputs: each window cut, with some probability, to its k most recent events.

Distillation (:class:`Trainer` with a ``teacher``): the student sees its (possibly cut) window, the
teacher the full window with the same end, so at each position the privileged teacher sees the
longer history the student lacks (``TrainConfig.teacher_input="cut"`` shows the teacher the
student's own input instead: plain distillation, for comparison). The loss is the fused CE + logit KD
(:func:`spnn_fast.functional.distillation_loss`) plus the knowledge-detector feature loss
(:class:`spnn_fast.nn.FeatureDistiller`) on named (student layer, teacher layer) pairs.

Runs unchanged under ``torchrun`` with DistributedDataParallel: each global batch is split across
ranks, losses are normalised by global counts (so N processes take the same steps as one process
with the same global batch), metrics are summed across ranks, and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from spnn_fast._io import atomic_write
from spnn_fast.data import Dataset
from spnn_fast.encode import encode_batch
from spnn_fast.functional import distillation_loss
from spnn_fast.metrics import MetricAccumulator, ranks_from_scores
from spnn_fast.model import SPNN
from spnn_fast.nn import FeatureDistiller
from spnn_fast.protocol import EvalSet, eval_sets, train_ends

__all__ = [
    "Batch",
    "TEACHER_INPUTS",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "fresh_targets",
    "training_windows",
    "world",
]


# What a distilled student's teacher reads (TrainConfig.teacher_input).
TEACHER_INPUTS = ("full", "cut")


def _integer(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check_window_stride(stride) -> None:
    """ValueError unless ``stride`` is None or an integer >= 1 (TrainConfig.window_stride)."""
    if stride is not None and not _integer(stride, 1):
        raise ValueError(f"window_stride={stride!r} must be None or an integer >= 1")


def _real(value, low: float, high: float = math.inf, *, open_low: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return (value > low if open_low else value >= low) and value <= high


@dataclass
class TrainConfig:
    """How a model is trained (the model's shape is its :class:`SPNNConfig`)."""

    epochs: int = 40
    batch_size: int = 128  # windows per global batch (split across ranks)
    lr: float = 1e-3
    weight_decay: float = 0.0
    # learning rate: "constant", or "cosine" (linear warmup over warmup_epochs, then a cosine decay
    # to min_lr_ratio * lr at the last of ``epochs``; early stopping may end the run before)
    schedule: str = "constant"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.05
    grad_clip: Optional[float] = 5.0
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    eval_batch_size: int = 512
    # None (or >= max_len): windows of max_len that do not overlap. S < max_len: a window ends
    # every S events; each target of an uncut window is still trained once per epoch, in the
    # window where it is among the last S or in the user's first window (see fresh_targets), so
    # it sees at least max_len - S earlier events or all the user has. A cut window (cut_prob)
    # keeps only the targets among its last k events.
    window_stride: Optional[int] = None
    # cold-start-like inputs: with probability cut_prob, a window keeps only its k most recent
    # events, k uniform on [cut_min, cut_max]
    cut_prob: float = 0.0
    cut_min: int = 1
    cut_max: int = 10
    # distillation (used when a teacher is given)
    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 1.0
    layer_pairs: List[Tuple[str, str]] = field(default_factory=list)
    # what the teacher reads for each window: "full" (its whole window: privileged, the default)
    # or "cut" (the student's own, possibly cut, input: plain distillation)
    teacher_input: str = "full"
    # With teacher_input="full" the frozen teacher's outputs on each window never change: they are
    # computed once, over every training window, and kept on the training device when they take
    # at most this many MiB (0: the teacher runs on every batch). Same values either way (bitwise
    # on the CPU; a GPU may round the last bit differently). Under DDP the ranks split the
    # teacher's work and each holds the whole cache (every rank meets every window).
    teacher_cache_mb: float = 1024.0
    d_knowledge: int = 64
    detector_weight: float = 1.0  # teacher: auxiliary next-item loss of its knowledge detector

    def __post_init__(self) -> None:
        # Checked here, before any training: a bad value would otherwise fail (or silently
        # train nothing, like patience 0) only once this model's turn comes in a long run.
        checks = {
            "epochs": (_integer(self.epochs, 1), "an integer >= 1"),
            "batch_size": (_integer(self.batch_size, 1), "an integer >= 1"),
            "eval_batch_size": (_integer(self.eval_batch_size, 1), "an integer >= 1"),
            "patience": (_integer(self.patience, 1), "an integer >= 1"),
            "lr": (_real(self.lr, 0.0, open_low=True), "a finite number > 0"),
            "weight_decay": (_real(self.weight_decay, 0.0), "a finite number >= 0"),
            "grad_clip": (self.grad_clip is None or _real(self.grad_clip, 0.0, open_low=True),
                          "None or a finite number > 0"),
            "warmup_epochs": (_real(self.warmup_epochs, 0.0), "a finite number >= 0"),
            "min_lr_ratio": (_real(self.min_lr_ratio, 0.0, 1.0), "a number in [0, 1]"),
            "cut_prob": (_real(self.cut_prob, 0.0, 1.0), "a number in [0, 1]"),
            "cut_min": (_integer(self.cut_min, 1), "an integer >= 1"),
            "cut_max": (_integer(self.cut_max, 1) and self.cut_max >= self.cut_min,
                        f"an integer >= cut_min ({self.cut_min})"),
            "alpha": (_real(self.alpha, 0.0, 1.0), "a number in [0, 1]"),
            "temperature": (_real(self.temperature, 1e-6), "a finite number >= 1e-6"),
            "feature_weight": (_real(self.feature_weight, 0.0), "a finite number >= 0"),
            "teacher_cache_mb": (_real(self.teacher_cache_mb, 0.0), "a finite number >= 0"),
            "d_knowledge": (_integer(self.d_knowledge, 1), "an integer >= 1"),
            "detector_weight": (_real(self.detector_weight, 0.0), "a finite number >= 0"),
        }  # fmt: skip
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be {rule}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} must be 'constant' or 'cosine'")
        if self.teacher_input not in TEACHER_INPUTS:
            raise ValueError(
                f"teacher_input={self.teacher_input!r} must be one of {', '.join(TEACHER_INPUTS)}"
            )
        check_window_stride(self.window_stride)
        self.layer_pairs = [tuple(p) for p in self.layer_pairs]

    def lr_factor(self, progress: float) -> float:
        """Multiplier of ``lr`` after ``progress`` epochs (fractional)."""
        if self.schedule == "constant":
            return 1.0
        if progress < self.warmup_epochs:
            return (progress + 1e-3) / (self.warmup_epochs + 1e-3)
        span = max(self.epochs - self.warmup_epochs, 1e-9)
        t = min(max((progress - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ ranks
def world() -> Tuple[int, int]:
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: Tensor) -> Tensor:
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# ------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    items: Tensor  # [B, L] int64
    timestamps: Tensor
    time_buckets: Tensor
    mask: Tensor  # [B, L] bool
    targets: Tensor  # [B, L] int64, 0 = no target
    users: Tensor  # [B] int64

    def to(self, device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def tail(self, n: int) -> Batch:
        """The last ``n`` columns (windows are left-padded: the newest events)."""
        if n >= self.items.shape[1]:
            return self
        return Batch(*(t[:, -n:] for t in (self.items, self.timestamps, self.time_buckets,
                                           self.mask, self.targets)), self.users)  # fmt: skip

    def cut(self, keep: Tensor) -> Batch:
        """The batch with only the last ``keep[b]`` columns of each row (cold-start inputs)."""
        L = self.items.shape[1]
        cols = torch.arange(L, device=self.items.device)
        visible = cols.unsqueeze(0) >= (L - keep).unsqueeze(1)
        z = lambda t: t * visible  # noqa: E731
        return Batch(
            z(self.items), z(self.timestamps), z(self.time_buckets), self.mask & visible,
            z(self.targets), self.users,
        )  # fmt: skip


def training_windows(
    log, max_len: int, stride: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, ends) of the training windows over each user's events ``[0, n-2)``: windows of
    ``max_len`` ending at ``n-2, n-2-S, n-2-2S, ...`` until one starts at the first event, with
    stride ``S = stride or max_len`` (``S < max_len``: overlapping windows; :func:`fresh_targets`
    keeps each target in one of them, after a long context). Windows without a trainable target
    are left out."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride} must be in [1, max_len={max_len}]")
    t_end = train_ends(log)
    counts = 1 + -(-np.maximum(t_end - max_len, 0) // stride)  # 1 + ceil(max(T - L, 0) / S)
    rows = np.repeat(np.arange(len(t_end), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(len(rows), dtype=np.int64) - np.repeat(first, counts)
    ends = t_end[rows] - k * stride
    # Left out: a newest window whose only target would be the validation event: one that holds a
    # single event, or, at stride 1, one whose other targets older windows hold (fresh_targets).
    newest = ends == t_end[rows]
    keep = ~(newest & ((ends == 1) | ((stride == 1) & (ends > max_len))))
    return rows[keep], ends[keep]


def fresh_targets(
    targets: Tensor, ends: np.ndarray, max_len: int, stride: Optional[int] = None
) -> Tensor:
    """``targets`` of windows from :func:`training_windows` ``(max_len, stride)`` with every
    target that an older window also holds set to 0, so each target is trained once per epoch.

    With overlapping windows (``stride S < max_len``) the window ending at ``e`` shares its first
    ``max_len - S`` events with the window ending at ``e - S``, which holds them later, after a
    longer context; a window that starts at the user's first event (``e <= max_len``) has no older
    window and keeps all its targets. So every kept target has at least ``max_len - S`` earlier
    events in its window, or all the events the user has before it. (The Trainer applies this
    before a cold-start cut, which then keeps only the targets among a window's last k events.)
    ``targets`` may have more columns than ``max_len``; its last columns are the windows'
    newest."""
    stride = stride or max_len
    if stride >= max_len:
        return targets
    older = torch.from_numpy(np.asarray(ends) > max_len).to(targets.device)
    cols = torch.arange(targets.shape[1], device=targets.device)
    covered = older.unsqueeze(1) & (cols < targets.shape[1] - stride).unsqueeze(0)
    return targets.masked_fill(covered, 0)


def make_batch(
    log,
    rows: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    num_time_buckets: int,
    train_end: Optional[np.ndarray] = None,
) -> Batch:
    """Encode windows and drop the targets that lie outside the training events.

    ``train_end``: :func:`~spnn_fast.protocol.train_ends` of ``log`` (computed here if None;
    callers that build many batches pass it once).
    """
    sb = encode_batch(
        log.offsets, log.items, log.timestamps, rows, ends, max_len,
        num_items=log.num_items, num_time_buckets=num_time_buckets,
    )  # fmt: skip
    targets = sb.targets
    train_end = train_ends(log) if train_end is None else train_end
    at_train_end = torch.from_numpy(ends == train_end[rows])
    # The last event of a window that ends at n-2 would predict the validation event.
    targets[at_train_end, -1] = 0
    return Batch(sb.items, sb.timestamps, sb.time_buckets, sb.mask, targets, torch.from_numpy(rows))


# ------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(
    model: SPNN,
    log,
    eval_set: EvalSet,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (5, 10, 20),
    with_se: bool = False,
):
    """Full-ranking HR/NDCG/MRR@K of ``model`` on ``eval_set`` (rows sharded across ranks).

    With ``with_se``: ``(metrics, standard_errors)``, the second the standard error over rows of
    each metric (see :meth:`~spnn_fast.metrics.MetricAccumulator.standard_errors`).
    """
    rank, size = world()
    was_training = model.training
    model.eval()
    cfg = model.config
    max_len = min(cfg.max_len, eval_set.max_history or cfg.max_len)
    acc = MetricAccumulator(ks, device=torch.device("cpu"))
    rows, ends, targets = (a[rank::size] for a in (eval_set.rows, eval_set.ends, eval_set.targets))
    t_end = train_ends(log)
    for s in range(0, len(rows), batch_size):
        b = make_batch(log, rows[s : s + batch_size], ends[s : s + batch_size], max_len,
                       cfg.num_time_buckets, t_end).to(device)  # fmt: skip
        hidden = model(b.items, b.timestamps, b.time_buckets, b.mask, b.users).hidden[:, -1]
        ranks = ranks_from_scores(model.score(hidden).float().cpu(), targets[s : s + batch_size])
        acc.add(ranks)
    state = _all_sum(acc.state())
    acc.load_state(state)
    model.train(was_training)
    return (acc.compute(), acc.standard_errors()) if with_se else acc.compute()


# ------------------------------------------------------------------------------------ loss
class _Objective(nn.Module):
    """The model(s) being trained and their loss for one (local) batch.

    A module so that DistributedDataParallel sees every trainable parameter (the student and the
    distillers' student projections); the frozen teacher is held outside the module tree.
    """

    def __init__(self, model: SPNN, tcfg: TrainConfig, teacher: Optional[SPNN]) -> None:
        super().__init__()
        self.model, self.tcfg = model, tcfg
        self._teacher = [teacher] if teacher is not None else []
        # the teacher layers that the distillers read (teacher_view returns them)
        self.teacher_layers = tuple(sorted({p[1] for p in tcfg.layer_pairs}))
        self.distillers = nn.ModuleDict()
        if teacher is not None and teacher.config.num_time_buckets != model.config.num_time_buckets:
            raise ValueError(
                f"teacher and student must share num_time_buckets, got "
                f"{teacher.config.num_time_buckets} and {model.config.num_time_buckets}"
            )
        if teacher is not None:
            for s_layer, t_layer in tcfg.layer_pairs:
                detector = teacher.detector(t_layer)
                if detector is None:
                    raise ValueError(
                        f"the teacher has no knowledge detector on {t_layer!r} "
                        f"(its detector_layers: {teacher.config.detector_layers})"
                    )
                self.distillers[_pair_name(s_layer, t_layer)] = FeatureDistiller(
                    _width(model, s_layer), _width(teacher, t_layer), tcfg.d_knowledge, detector
                )

    @property
    def teacher(self) -> Optional[SPNN]:
        return self._teacher[0] if self._teacher else None

    def teacher_view(self, b_full: Batch, L: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The frozen teacher on ``b_full``: its hidden states and its paired layers' outputs over
        the last ``L`` columns (the student's)."""
        with torch.no_grad():
            t_out = self.teacher(b_full.items, b_full.timestamps, b_full.time_buckets,
                                 b_full.mask, b_full.users, return_layers=self.teacher_layers)  # fmt: skip
        return t_out.hidden[:, -L:], {k: v[:, -L:] for k, v in t_out.layers.items()}

    def forward(
        self,
        b: Batch,
        norm: Dict[str, float],
        b_full: Optional[Batch] = None,
        t_view: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None,
    ) -> Tuple[Tensor, Dict]:
        """Loss of the student batch ``b``. With a teacher: ``t_view`` is its
        :meth:`teacher_view` of the same windows, or it is computed here from ``b_full``, the
        teacher's view (as long as the teacher's ``max_len``, its last columns lining up with
        ``b``; uncut, or cut like ``b`` with ``teacher_input="cut"``)."""
        tcfg, model, teacher = self.tcfg, self.model, self.teacher
        s_layers = tuple({p[0] for p in tcfg.layer_pairs}) if teacher is not None else ()
        det_layers = tuple(model.config.detector_layers)
        out = model(b.items, b.timestamps, b.time_buckets, b.mask, b.users,
                    return_layers=s_layers + det_layers)  # fmt: skip
        sel = b.targets > 0
        h = out.hidden[sel]
        y = b.targets[sel] - 1  # item ids 1..V -> rows of the item table
        stats = {}
        if teacher is None:
            loss = distillation_loss(h, model.item_table(), target=y, alpha=0.0, reduction="sum",
                                     backend=model.config.backend)  # fmt: skip
        else:
            if t_view is None:
                t_view = self.teacher_view(b_full, b.items.shape[1])
            t_hidden, t_layers = t_view
            loss = distillation_loss(
                h, model.item_table(), t_hidden[sel], teacher.item_table(), y,
                temperature=tcfg.temperature, alpha=tcfg.alpha, reduction="sum",
                backend=model.config.backend,
            )  # fmt: skip
        loss = loss / norm["targets"]
        stats["ce"] = loss.detach()
        for s_layer, t_layer in tcfg.layer_pairs if teacher is not None else ():
            name = _pair_name(s_layer, t_layer)
            # FeatureDistiller averages over its local rows; rescale to the global batch.
            fd = self.distillers[name](out.layers[s_layer], t_layers[t_layer], b.mask)
            fd = fd * b.mask.shape[0] / norm["rows"]
            stats[f"feat:{name}"] = fd.detach()
            loss = loss + tcfg.feature_weight * fd
        for layer in det_layers:
            aux = self._detector_loss(model, layer, out.layers[layer], b) / norm["aux"]
            stats[f"detector:{layer}"] = aux.detach()
            loss = loss + tcfg.detector_weight * aux
        return loss, stats

    @staticmethod
    def _detector_loss(model: SPNN, layer: str, feats: Tensor, b: Batch) -> Tensor:
        """Auxiliary next-item loss that trains a teacher's knowledge detector.

        The detector pools the (detached) layer features over the window up to the last event that
        has a target and predicts that target with the (detached) item table, so it learns which
        positions carry the next item without changing the teacher itself.
        """
        mask, y, ok = _detector_targets(b)
        pooled = model.detector(layer).pool(feats.detach()[ok], mask[ok])
        return distillation_loss(pooled, model.item_table().detach(), target=y[ok] - 1,
                                 alpha=0.0, reduction="sum", backend=model.config.backend)  # fmt: skip


def _detector_targets(b: Batch) -> Tuple[Tensor, Tensor, Tensor]:
    """What a knowledge detector learns from in each row: the events it may pool (the window up
    to its last event with a target), that target (0 = none) and the rows that have one."""
    last = b.targets[:, -1] > 0
    mask = b.mask.clone()
    mask[~last, -1] = False
    prev = b.targets[:, -2] if b.targets.shape[1] > 1 else b.targets[:, -1]
    y = torch.where(last, b.targets[:, -1], prev)
    return mask, y, (y > 0) & mask.any(1)


def _pair_name(s_layer: str, t_layer: str) -> str:
    return f"{s_layer}->{t_layer}".replace(".", "_")  # ModuleDict keys cannot hold "."


def _width(model: SPNN, layer: str) -> int:
    if layer not in model.config.layer_names():
        raise ValueError(f"unknown layer {layer!r}; valid: {model.config.layer_names()}")
    return model.config.d_model


# ------------------------------------------------------------------------------------ trainer
def _atomic_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class Trainer:
    """Trains one model with early stopping on validation NDCG@10, checkpointing every epoch.

    Args:
        model: the model to train (moved to ``device``).
        dataset: the data (its log is split leave-one-out).
        tcfg: the training configuration.
        teacher: a trained teacher to distil from (frozen), or None for plain CE training.
        seed: seeds initialisation order, window shuffles, cuts and dropout (per epoch, so a
            resumed run repeats an uninterrupted one).
        device: where to train.
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        model: SPNN,
        dataset: Dataset,
        tcfg: TrainConfig,
        *,
        teacher: Optional[SPNN] = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        desc: str = "train",
    ) -> None:
        self.device = torch.device(device)
        self.dataset, self.log, self.tcfg, self.seed = dataset, dataset.log, tcfg, seed
        self.model = model.to(self.device)
        if teacher is not None:
            if teacher.config.max_len < model.config.max_len:
                raise ValueError(
                    f"the teacher's max_len ({teacher.config.max_len}) must be >= the student's "
                    f"({model.config.max_len}): it reads at least the student's window"
                )
            teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.objective = _Objective(self.model, tcfg, teacher).to(self.device)
        rank, size = world()
        self.rank, self.size = rank, size
        self.step_module: nn.Module = self.objective
        if size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(self.objective)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        # A stride of max_len or more: windows that do not overlap.
        self.stride = min(tcfg.window_stride or model.config.max_len, model.config.max_len)
        self.windows = training_windows(self.log, model.config.max_len, self.stride)
        self.train_end = train_ends(self.log)
        self.splits = eval_sets(self.log)
        self.progress, self.desc = progress and rank == 0, desc
        self.history: List[Dict] = []
        self.epoch = 0
        self.best = {"ndcg": -1.0, "epoch": -1, "state": None}
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.windows_seen = 0
        self._teacher_cache = None  # see teacher_cache

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

    def _teacher_batch(self, rows: np.ndarray, ends: np.ndarray) -> Batch:
        """Windows as long as the longer of the student's and the teacher's ``max_len`` (the
        teacher sees up to its own max_len events before each window end)."""
        teacher = self.objective.teacher
        max_len = max(self.model.config.max_len, teacher.config.max_len if teacher else 0)
        return make_batch(self.log, rows, ends, max_len, self.model.config.num_time_buckets,
                          self.train_end).to(self.device)  # fmt: skip

    def teacher_cache(self) -> Optional[Tuple[Tensor, Dict[str, Tensor]]]:
        """The frozen teacher's :meth:`_Objective.teacher_view` of every training window (rows in
        ``windows`` order), built on first use; None where the teacher runs on every batch: no
        teacher, ``teacher_input="cut"`` (its input depends on each batch's cuts), or a cache
        larger than ``teacher_cache_mb``. Under torch.distributed the first call is a collective
        (the ranks share the teacher's work): the trainer makes it on every rank at once."""
        teacher = self.objective.teacher
        if teacher is None or self.tcfg.teacher_input != "full":
            return None
        if self._teacher_cache is None:
            n, L = len(self.windows[0]), self.model.config.max_len
            size = n * L * teacher.config.d_model * (1 + len(self.objective.teacher_layers))
            if size * teacher.item_table().element_size() > self.tcfg.teacher_cache_mb * 2**20:
                self._teacher_cache = ()  # too large: the teacher runs on every batch
                return None
            self._teacher_cache = self._build_teacher_cache(n, L)
        return self._teacher_cache or None

    def _build_teacher_cache(self, n: int, L: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The teacher's view of every window, filled in place (no second copy of the cache).
        Under torch.distributed each rank computes every ``size``-th window and the ranks
        broadcast their shares in turn, so the teacher runs once per window in all (a collective:
        every rank builds its cache at the same step)."""
        teacher, t_layers = self.objective.teacher, self.objective.teacher_layers
        rank, size = world()
        rows, ends = self.windows
        like = teacher.item_table()
        new = lambda: like.new_empty((n, L, teacher.config.d_model))  # noqa: E731
        cache = (new(), {k: new() for k in t_layers})
        mine = np.arange(rank, n, size)
        B = self.tcfg.eval_batch_size
        for s in range(0, len(mine), B):
            w = mine[s : s + B]
            h, lay = self.objective.teacher_view(self._teacher_batch(rows[w], ends[w]), L)
            at = torch.as_tensor(w, device=h.device)
            cache[0][at] = h
            for k in t_layers:
                cache[1][k][at] = lay[k]
        if size > 1:
            for src in range(min(size, n)):
                at = torch.arange(src, n, size, device=like.device)
                for t in (cache[0], *cache[1].values()):
                    part = t[at]  # a gathered (contiguous) copy of src's rows
                    dist.broadcast(part, src)
                    if src != rank:
                        t[at] = part
        return cache

    def step(self, idx: np.ndarray, keep: np.ndarray) -> Dict[str, float]:
        """One optimizer step on a global batch: the windows ``windows[idx]``, window ``i`` cut
        to its last ``keep[i]`` events (this rank takes its share)."""
        cfg = self.model.config
        local = idx[self.rank :: self.size]
        rows, ends = (a[local] for a in self.windows)
        full = self._teacher_batch(rows, ends)
        keep_t = torch.as_tensor(keep[self.rank :: self.size], device=self.device)
        b = full.tail(cfg.max_len)
        b = dataclasses.replace(
            b, targets=fresh_targets(b.targets, ends, cfg.max_len, self.stride)
        ).cut(keep_t)
        cache, t_view = self.teacher_cache(), None
        if cache is not None:
            at = torch.as_tensor(local, device=self.device)
            t_view = (cache[0][at], {k: v[at] for k, v in cache[1].items()})
        elif self.objective.teacher is not None and self.tcfg.teacher_input == "cut":
            full = full.cut(keep_t)  # the teacher reads exactly what the student reads
        norm = self._norm(b)
        loss, stats = self.step_module(b, norm, full, t_view)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; the losses are normalised by global counts, so
        # scale by the world size to make the average a sum.
        (loss * self.size).backward()
        if self.tcfg.grad_clip:
            nn.utils.clip_grad_norm_(self.objective.parameters(), self.tcfg.grad_clip)
        self.optimizer.step()
        return {"loss": float(loss.detach()) * self.size, **{k: float(v) for k, v in stats.items()}}

    def _norm(self, b: Batch) -> Dict[str, float]:
        aux_rows = _detector_targets(b)[2].sum() if self.model.config.detector_layers else 0
        local = torch.tensor(
            [float((b.targets > 0).sum()), float(b.items.shape[0]), float(aux_rows)],
            dtype=torch.float64,
        )
        g = _all_sum(local.to(self.device) if self.device.type == "cuda" else local).cpu()
        return {"targets": max(g[0].item(), 1.0), "rows": max(g[1].item(), 1.0),
                "aux": max(g[2].item(), 1.0)}  # fmt: skip

    # ---------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> float:
        torch.manual_seed(self.seed * 100_003 + epoch)  # dropout: a function of (seed, epoch)
        self.model.train()
        n_batches = math.ceil(len(self.windows[0]) / self.tcfg.batch_size)
        total, t0 = 0.0, time.perf_counter()
        bar = _bar(n_batches, f"{self.desc} ep {epoch + 1}", self.progress)
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
        self.train_seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
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
            self._load(torch.load(last_path, map_location=self.device, weights_only=True))
            log(f"{self.desc}: resumed after epoch {self.epoch}")
        while self.epoch < self.tcfg.epochs and self.bad_epochs < self.tcfg.patience:
            loss = self.train_epoch(self.epoch)
            valid = self.evaluate("valid")
            ndcg = valid["NDCG@10"]
            self.history.append({"epoch": self.epoch + 1, "loss": loss, "valid_NDCG@10": ndcg,
                                 "valid_HR@10": valid["HR@10"]})  # fmt: skip
            if ndcg > self.best["ndcg"]:
                self.best = {"ndcg": ndcg, "epoch": self.epoch + 1,
                             "state": {k: v.detach().clone() for k, v in
                                       self.model.state_dict().items()}}  # fmt: skip
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            self.epoch += 1
            if self.progress:
                log(f"{self.desc} epoch {self.epoch}: loss {loss:.4f}  valid NDCG@10 {ndcg:.4f}"
                    f"  (best {self.best['ndcg']:.4f} @ {self.best['epoch']})")  # fmt: skip
            if last_path and self.rank == 0:
                os.makedirs(ckpt_dir, exist_ok=True)
                _atomic_save(self._state(), last_path)
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
        self.epoch, self.history, self.best = st["epoch"], st["history"], st["best"]
        self.bad_epochs, self.train_seconds = st["bad_epochs"], st["train_seconds"]
        self.windows_seen = st["windows_seen"]


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
