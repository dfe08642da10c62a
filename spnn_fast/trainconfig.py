"""How one model trains (:class:`TrainConfig`); the main job's settings, which take their
defaults from here, are :class:`spnn_fast.config.ExperimentConfig`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from spnn_fast._checks import is_int, is_real, plain_number
from spnn_fast.reference.distill_ensemble import ENSEMBLES

__all__ = [
    "LOSSES",
    "SAMPLED_ABOVE",
    "SAMPLINGS",
    "SCHEDULES",
    "TEACHER_INPUTS",
    "TrainConfig",
    "check_window_stride",
    "report_fields",
]

SCHEDULES = ("constant", "cosine")
# The next-item loss: "full" cross-entropy over the whole catalogue, "sampled" softmax over each
# target and `negatives` items shared by the batch, or "auto": full up to SAMPLED_ABOVE items,
# sampled above (docs/experiments.md: where the full loss's cost passes the rest of a step).
LOSSES = ("auto", "full", "sampled")
SAMPLED_ABOVE = 20_000
# How the sampled loss draws its negatives: by the items' training counts (logQ-corrected) or
# uniformly over the catalogue.
SAMPLINGS = ("popularity", "uniform")
# What a distilled student's teacher reads: its whole window ("full", privileged) or the
# student's own, possibly cut, input ("cut": plain distillation).
TEACHER_INPUTS = ("full", "cut")
# The names of a layer of any SPNN (SPNNConfig.layer_names() holds a given model's).
_LAYER_NAME = re.compile(r"embed|layers\.(0|[1-9][0-9]*)")


def check_window_stride(stride) -> None:
    """ValueError unless ``stride`` is None or an integer >= 1 (TrainConfig.window_stride)."""
    if stride is not None and not is_int(stride, 1):
        raise ValueError(f"window_stride={stride!r} must be None or an integer >= 1")


def _layer_pairs(pairs) -> List[Tuple[str, str]]:
    """``pairs`` (TrainConfig.layer_pairs) as a list of (student layer, teacher layer) tuples;
    ValueError for another shape, or a name no SPNN's layer has."""
    if not isinstance(pairs, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(n, str) and _LAYER_NAME.fullmatch(n) for n in p) for p in pairs
    ):  # fmt: skip
        raise ValueError(f"layer_pairs={pairs!r} must be a list of (student layer, teacher "
                         f"layer) pairs of layer names ('embed' or 'layers.N', as "
                         f"SPNNConfig.layer_names() gives them), such as "
                         f"[('layers.0', 'layers.1')]")  # fmt: skip
    return [tuple(p) for p in pairs]


def report_fields(owner: str, obj, checks: Dict[str, Tuple[bool, str]]) -> None:
    """ValueError naming the first field of ``obj`` whose check fails, with its rule."""
    for name, (ok, rule) in checks.items():
        if not ok:
            prefix = f"{owner}." if owner else ""
            raise ValueError(f"{prefix}{name}={getattr(obj, name)!r} must be {rule}")


@dataclass
class TrainConfig:
    """How a model is trained (the model's shape is its :class:`SPNNConfig`)."""

    epochs: int = 50  # a budget: early stopping (patience) ends most runs before it
    batch_size: int = 256  # windows per global batch (split across ranks)
    lr: float = 2e-3
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
    window_stride: Optional[int] = 10
    # cold-start-like inputs: with probability cut_prob, a window keeps only its k most recent
    # events, k uniform on [cut_min, cut_max]
    cut_prob: float = 0.0
    cut_min: int = 1
    cut_max: int = 10
    # distillation (used when a teacher is given)
    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 1.0 / 64  # the feature loss sums squares over d_knowledge = 64 dims
    layer_pairs: List[Tuple[str, str]] = field(default_factory=list)
    teacher_input: str = "full"  # one of TEACHER_INPUTS
    # With several teachers (an ensemble for the logit term): how their predictions combine, one
    # of ENSEMBLES (see spnn_fast.functional.distillation_loss)
    ensemble: str = "distributions"
    # With teacher_input="full" the frozen teacher's outputs on each window never change: they are
    # computed once, over every training window, and kept on the training device when they take
    # at most this many MiB (0: the teacher runs on every batch; None: a quarter of the memory
    # available on the device, spnn_fast.teacher.cache_budget). Same values either way (bitwise
    # on the CPU; a GPU may round the last bit differently). Under DDP the ranks split the
    # teacher's work and each holds the whole cache (every rank meets every window).
    teacher_cache_mb: Optional[float] = None
    d_knowledge: int = 64
    detector_weight: float = 1.0  # teacher: auxiliary next-item loss of its knowledge detector
    loss: str = "auto"  # one of LOSSES
    negatives: int = 1024  # the sampled loss's negatives per step, shared by the batch
    sampling: str = "popularity"  # one of SAMPLINGS
    # torch.compile the training step (the model and its loss, forward and backward) whole:
    # fullgraph, static shapes (one graph per batch shape). Off by default: see
    # docs/experiments.md for where it measured faster.
    compile: bool = False

    def __post_init__(self) -> None:
        # Checked here, before any training: a bad value would otherwise fail (or silently
        # train nothing, like patience 0) only once this model's turn comes in a long run.
        for f in dataclasses.fields(self):
            setattr(self, f.name, plain_number(getattr(self, f.name)))
        report_fields("TrainConfig", self, {
            "epochs": (is_int(self.epochs, 1), "an integer >= 1"),
            "batch_size": (is_int(self.batch_size, 1), "an integer >= 1"),
            "eval_batch_size": (is_int(self.eval_batch_size, 1), "an integer >= 1"),
            "patience": (is_int(self.patience, 1), "an integer >= 1"),
            "lr": (is_real(self.lr, 0.0, open_low=True), "a finite number > 0"),
            "weight_decay": (is_real(self.weight_decay, 0.0), "a finite number >= 0"),
            "grad_clip": (self.grad_clip is None or is_real(self.grad_clip, 0.0, open_low=True),
                          "None or a finite number > 0"),
            "warmup_epochs": (is_real(self.warmup_epochs, 0.0), "a finite number >= 0"),
            "min_lr_ratio": (is_real(self.min_lr_ratio, 0.0, 1.0), "a number in [0, 1]"),
            "cut_prob": (is_real(self.cut_prob, 0.0, 1.0), "a number in [0, 1]"),
            "cut_min": (is_int(self.cut_min, 1), "an integer >= 1"),
            "cut_max": (is_int(self.cut_max, 1) and self.cut_max >= self.cut_min,
                        f"an integer >= cut_min ({self.cut_min})"),
            "alpha": (is_real(self.alpha, 0.0, 1.0), "a number in [0, 1]"),
            "temperature": (is_real(self.temperature, 1e-6), "a finite number >= 1e-6"),
            "feature_weight": (is_real(self.feature_weight, 0.0), "a finite number >= 0"),
            "teacher_cache_mb": (self.teacher_cache_mb is None
                                 or is_real(self.teacher_cache_mb, 0.0),
                                 "None (a quarter of the free memory) or a finite number >= 0"),
            "d_knowledge": (is_int(self.d_knowledge, 1), "an integer >= 1"),
            "compile": (isinstance(self.compile, bool), "True or False"),
            "loss": (self.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
            "negatives": (is_int(self.negatives, 1), "an integer >= 1"),
            "sampling": (self.sampling in SAMPLINGS, f"one of {', '.join(SAMPLINGS)}"),
            "detector_weight": (is_real(self.detector_weight, 0.0), "a finite number >= 0"),
            "schedule": (self.schedule in SCHEDULES, "'constant' or 'cosine'"),
            "ensemble": (self.ensemble in ENSEMBLES, f"one of {', '.join(ENSEMBLES)}"),
            "teacher_input": (self.teacher_input in TEACHER_INPUTS,
                              f"one of {', '.join(TEACHER_INPUTS)}"),
        })  # fmt: skip
        check_window_stride(self.window_stride)
        self.layer_pairs = _layer_pairs(self.layer_pairs)

    def lr_factor(self, progress: float) -> float:
        """Multiplier of ``lr`` after ``progress`` epochs (fractional)."""
        if self.schedule == "constant":
            return 1.0
        if progress < self.warmup_epochs:
            return (progress + 1e-3) / (self.warmup_epochs + 1e-3)
        span = max(self.epochs - self.warmup_epochs, 1e-9)
        t = min(max((progress - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def sampled(self, num_items: int) -> bool:
        """Whether a catalogue of ``num_items`` items trains with the sampled loss."""
        return self.loss == "sampled" or (self.loss == "auto" and num_items > SAMPLED_ABOVE)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
