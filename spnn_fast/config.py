"""Settings, each defined once: how a model trains (:class:`TrainConfig`) and what the main job
runs (:class:`ExperimentConfig`, whose fields are also the ``spnn-fast train`` flags).

The defaults are the main job's: a field of :class:`ExperimentConfig` that means the same as a
field of :class:`TrainConfig` or :class:`~spnn_fast.model.SPNNConfig` takes its default from
there. Every number is checked when a config is built, before anything is written or trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from spnn_fast import backends, limits
from spnn_fast._checks import check_device, is_int, is_real, plain_number
from spnn_fast.log import TIME_UNITS
from spnn_fast.model import MODEL_BACKENDS, SPNN, SPNNConfig
from spnn_fast.reference.distill_ensemble import ENSEMBLES
from spnn_fast.trainconfig import (
    LOSSES,
    SAMPLED_ABOVE,
    SAMPLINGS,
    SCHEDULES,
    TEACHER_INPUTS,
    TrainConfig,
    check_window_stride,
    report_fields,
)

__all__ = [
    "ENSEMBLES",
    "KD_TEACHERS",
    "MAX_LAYERS",
    "MAX_LEN",
    "MAX_WIDTH",
    "MODEL_BACKENDS",
    "SCHEDULES",
    "STUDENT_MAX_D",
    "TEACHER_INPUTS",
    "ExperimentConfig",
    "TrainConfig",
    "check_window_stride",
    "num_parameters",
]

# What student_kd's logit term learns from: its own seed's teacher, or the ensemble of the run's
# teachers (one per seed); and how an ensemble's predictions combine.
KD_TEACHERS = ("seed", "ensemble")
# Bounds of the main job's model shapes, so that a slip of the finger (--max-len 100000000) is
# refused before anything is written instead of allocating a position table of gigabytes: a
# window of L events holds L x L attention scores per head and sequence (64 MiB at L = MAX_LEN).
MAX_LEN = 4096
MAX_WIDTH = 4096  # d_model of a model
MAX_LAYERS = 64
# The students' width when student_d is None: at most this, the largest multiple of
# student_heads that keeps a student within 1/4 of the teacher's parameters on the data.
STUDENT_MAX_D = 24


def setting(default, help: str, **cli):
    """A field of :class:`ExperimentConfig`: its default, the help text of its command-line flag
    and, in ``cli``, argparse options for it (``choices``, ``metavar``, ``aliases``)."""
    return field(default=default, metadata={"help": help, **cli})


_T, _S = TrainConfig, SPNNConfig  # the defaults ExperimentConfig shares


@dataclass
class ExperimentConfig:
    """The main job (:func:`spnn_fast.experiment.run`): a teacher, a student and a distilled
    student per seed. Every field is a flag of ``spnn-fast train`` (``--max-len`` for
    ``max_len``); a flag of an ``Optional`` field takes ``None`` too."""

    dataset: str = setting("ml-100k", "a known data set name, or the path of a RecBole .inter "
                           "file, a MovieLens-1M ratings.dat or a CSV file", aliases=("--data",))  # fmt: skip
    time_unit: Optional[str] = setting(None, "the unit of the data's timestamps, s, ms, us or "
                                       "ns (None: seconds, refusing values that look like ms, "
                                       "us or ns)")  # fmt: skip
    seeds: int = setting(3, "seeds 0..N-1; each trains the three models")
    epochs: int = setting(_T.epochs, "epoch budget; early stopping ends most runs before it")
    device: str = setting("cpu", "where to train: cpu, cuda or cuda:N")
    max_len: int = setting(_S.max_len, "events each model reads (the most recent ones)")
    teacher_max_len: Optional[int] = setting(None, "events the teacher reads (None: max_len)")
    teacher_d: int = setting(_S.d_model, "the teacher's width")
    teacher_layers: int = setting(_S.n_layers, "the teacher's semantic perception layers")
    teacher_heads: int = setting(_S.n_heads, "the teacher's attention heads")
    student_d: Optional[int] = setting(
        None, f"the students' width (None: the largest multiple of student_heads <= "
        f"{STUDENT_MAX_D} that keeps a student at most 1/4 of the teacher's parameters on the "
        f"data; the report names it)")  # fmt: skip
    student_layers: int = setting(1, "the students' layers")
    student_heads: int = setting(1, "the students' attention heads")
    dropout: float = setting(0.2, "the students' dropout (and the teacher's when "
                             "teacher_dropout is None)")  # fmt: skip
    teacher_dropout: Optional[float] = setting(_S.dropout, "the teacher's dropout (None: "
                                               "dropout)")  # fmt: skip
    batch_size: int = setting(_T.batch_size, "windows per batch (split across ranks)")
    lr: float = setting(_T.lr, "learning rate (AdamW)")
    schedule: str = setting(_T.schedule, "learning rate: constant, or warmup + cosine decay "
                            "over the epoch budget", choices=SCHEDULES)  # fmt: skip
    patience: int = setting(_T.patience, "epochs without a better validation NDCG@10 before "
                            "a model stops")  # fmt: skip
    window_stride: Optional[int] = setting(
        _T.window_stride, "a training window ends every N events and each target of an uncut "
        "window is trained once, after at least max_len - N earlier events (None: windows of "
        "max_len that do not overlap)")  # fmt: skip
    cut_prob: float = setting(0.5, "the students: share of windows cut to a short, "
                              "cold-start-like history")  # fmt: skip
    teacher_cut_prob: float = setting(_T.cut_prob, "the teacher: the same cut, as augmentation")
    cut_min: int = setting(_T.cut_min, "a cut window keeps k events, k uniform in "
                           "[cut_min, cut_max]")  # fmt: skip
    cut_max: int = setting(_T.cut_max, "see cut_min")
    alpha: float = setting(_T.alpha, "student_kd: weight of the logit distillation against CE")
    temperature: float = setting(_T.temperature, "student_kd: temperature of the logit "
                                 "distillation")  # fmt: skip
    feature_weight: float = setting(_T.feature_weight, "student_kd: weight of the "
                                    "knowledge-detector feature loss (0: off)")  # fmt: skip
    kd_teacher_input: str = setting(_T.teacher_input, "what student_kd's teacher reads: its "
                                    "full window (privileged) or the student's own, possibly "
                                    "cut, input", choices=TEACHER_INPUTS)  # fmt: skip
    kd_teacher: str = setting("seed", "what student_kd's logit term learns from: its own seed's "
                              "teacher, or the ensemble of all the run's teachers (one per "
                              "seed; its feature term reads its own seed's teacher either way)",
                              choices=KD_TEACHERS)  # fmt: skip
    kd_ensemble: str = setting(_T.ensemble, "with kd_teacher ensemble: the mean of the teachers' "
                               "temperature-softened distributions, or the softmax of their "
                               "mean logits", choices=ENSEMBLES)  # fmt: skip
    use_side_features: bool = setting(True, "item and user features where the data has them")
    backend: Optional[str] = setting(None, "attention and losses: auto, triton or torch "
                                     "(None: $SPNN_FAST_BACKEND, else auto)")  # fmt: skip
    loss: str = setting(_T.loss, f"the next-item loss: full cross-entropy over the catalogue, "
                        f"sampled softmax (a target against shared negatives), or auto: full up "
                        f"to {SAMPLED_ABOVE:,} items", choices=LOSSES)  # fmt: skip
    negatives: int = setting(_T.negatives, "the sampled loss's negatives per step")
    sampling: str = setting(_T.sampling, "how the sampled loss draws its negatives: by the "
                            "items' training counts (logQ-corrected) or uniformly",
                            choices=SAMPLINGS)  # fmt: skip
    compile: bool = setting(_T.compile, "torch.compile each training step whole (fullgraph, "
                            "static shapes); the same losses to float tolerance")  # fmt: skip
    teacher_cache_mb: Optional[float] = setting(
        _T.teacher_cache_mb, "student_kd keeps its teacher's outputs on every window when they "
        "fit in this many MiB (0: the teacher runs on every batch, same results; None: a quarter "
        "of the memory available on the device)")  # fmt: skip

    # What may change when a run folder is reused: the device (a run may go on elsewhere), the
    # number of seeds (a run may gain seeds; the ones done are reused) and the teacher cache's
    # budget (speed only).
    MAY_CHANGE = ("device", "seeds", "teacher_cache_mb")

    def __post_init__(self) -> None:
        # Checked before a run folder is written or a model trained (the model shapes once the
        # data are loaded). Numbers and paths become Python's (run.json holds them).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            setattr(self, f.name, os.fspath(v) if isinstance(v, os.PathLike) else plain_number(v))
        t, b, inputs = self.teacher_dropout, self.backend, ", ".join(TEACHER_INPUTS)
        report_fields("", self, {
            "dataset": (isinstance(self.dataset, str) and bool(self.dataset.strip()),
                        "a data set name or a path of data (a string that is not empty)"),
            "time_unit": (self.time_unit is None or self.time_unit in TIME_UNITS,
                          f"None or one of {', '.join(TIME_UNITS)}"),
            "seeds": (is_int(self.seeds, 1), "an integer >= 1"),
            "dropout": (is_real(self.dropout, 0.0) and self.dropout < 1.0, "a number in [0, 1)"),
            "teacher_dropout": (t is None or (is_real(t, 0.0) and t < 1.0),
                                "None (the same as dropout) or a number in [0, 1)"),
            "teacher_cut_prob": (is_real(self.teacher_cut_prob, 0.0, 1.0), "a number in [0, 1]"),
            "kd_teacher_input": (self.kd_teacher_input in TEACHER_INPUTS, f"one of {inputs}"),
            "kd_teacher": (self.kd_teacher in KD_TEACHERS, f"one of {', '.join(KD_TEACHERS)}"),
            "kd_ensemble": (self.kd_ensemble in ENSEMBLES, f"one of {', '.join(ENSEMBLES)}"),
            "use_side_features": (isinstance(self.use_side_features, bool), "True or False"),
            "backend": (b is None or (isinstance(b, str) and b.lower() in MODEL_BACKENDS),
                        f"None or one of {', '.join(MODEL_BACKENDS)} (attention and the losses "
                        f"have no other implementation)"),
        })  # fmt: skip
        m = self.teacher_max_len
        if m is not None and (not is_int(m, 1) or (is_int(self.max_len, 1) and m < self.max_len)):
            raise ValueError(
                f"teacher_max_len={m!r} must be None (= max_len) or an integer >= max_len "
                f"({self.max_len}): the teacher reads at least the student's window"
            )
        self._check_shapes()
        if self.kd_teacher == "ensemble" and is_int(self.seeds) and self.seeds < 2:
            raise ValueError(
                f"kd_teacher='ensemble' distils from the ensemble of the run's teachers, one per "
                f"seed: it needs seeds >= 2, got seeds={self.seeds}"
            )
        check_device(self.device)
        self.train_configs()  # every TrainConfig check (rates, distillation weights, windows)

    def _check_shapes(self) -> None:
        """The models' shapes, each against its rule and its bound (this module's MAX_*)."""
        window = f"an integer in [1, {MAX_LEN}] (the bound spnn_fast.config.MAX_LEN)"
        width = f"an integer in [1, {MAX_WIDTH}] (the bound spnn_fast.config.MAX_WIDTH)"
        layers = f"an integer in [1, {MAX_LAYERS}] (the bound spnn_fast.config.MAX_LAYERS)"
        bounded = {  # name: (bound, rule); None accepted where the field says so
            "max_len": (MAX_LEN, window), "teacher_max_len": (MAX_LEN, window),
            "teacher_d": (MAX_WIDTH, width), "student_d": (MAX_WIDTH, width),
            "teacher_layers": (MAX_LAYERS, layers), "student_layers": (MAX_LAYERS, layers),
            "teacher_heads": (math.inf, "an integer >= 1"),
            "student_heads": (math.inf, "an integer >= 1"),
        }  # fmt: skip
        for name, (bound, rule) in bounded.items():
            v = getattr(self, name)
            if v is None and name in ("teacher_max_len", "student_d"):
                continue
            if not is_int(v, 1) or v > bound:
                none = "None or " if name in ("teacher_max_len", "student_d") else ""
                raise ValueError(f"{name}={v!r} must be {none}{rule}")
        for who in ("teacher", "student"):
            d, heads = getattr(self, f"{who}_d"), getattr(self, f"{who}_heads")
            if d is not None and d % heads:
                raise ValueError(
                    f"{who}_d={d} must be a multiple of {who}_heads={heads}: each head takes "
                    f"{who}_d / {who}_heads dims"
                )
        if self.student_d is None and self.student_heads > STUDENT_MAX_D:
            raise ValueError(
                f"student_heads={self.student_heads} leaves no default student width (a "
                f"multiple of student_heads <= {STUDENT_MAX_D}): give student_d"
            )

    def check_backend(self) -> None:
        """ValueError unless the models' attention and losses can run here with ``backend`` on
        ``device`` (None: ``$SPNN_FAST_BACKEND``, else auto): the check the first training step
        would make, made before anything is written."""
        try:
            backends.select("attention and losses", self.backend, ("triton", "torch"),
                            self.device)  # fmt: skip
        except backends.BackendUnavailableError as e:
            raise ValueError(f"backend={self.backend!r} on device={self.device!r}: {e}") from None
        if not isinstance(self.backend, str) or self.backend.lower() != "triton":
            return  # auto falls back to torch where a kernel cannot take a shape
        widths = {"teacher": self.teacher_d, "student": self.student_d or STUDENT_MAX_D}
        for who, d in widths.items():
            head = d // getattr(self, f"{who}_heads")
            if head > limits.ATTN_HEAD_DIMS[-1]:
                raise ValueError(
                    f"backend='triton': the {who}'s heads are {head} wide, the attention kernels "
                    f"take at most {limits.ATTN_HEAD_DIMS[-1]}; use more heads or backend=auto"
                )
            if d > limits.DISTILL_MAX_DIM:
                raise ValueError(
                    f"backend='triton': {who}_d={d} is wider than the distillation kernels take "
                    f"({limits.DISTILL_MAX_DIM}); use backend=auto"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def spelled_out(self) -> ExperimentConfig:
        """This configuration with the teacher's settings whose None stands for the common one
        (``teacher_dropout``, ``teacher_max_len``) given as that value: what the models use, and
        how two ways of asking for one run compare equal."""
        return dataclasses.replace(
            self,
            teacher_dropout=self.dropout if self.teacher_dropout is None else self.teacher_dropout,
            teacher_max_len=self.teacher_max_len or self.max_len,
            # how an ensemble combines says nothing without one
            kd_ensemble=self.kd_ensemble if self.kd_teacher == "ensemble" else _T.ensemble,
        )

    def differences(self, other: ExperimentConfig) -> List[str]:
        """The fields, but those in :attr:`MAY_CHANGE`, in which the two runs differ (each
        compared as the models see it, :meth:`spelled_out`)."""
        a, b = self.spelled_out().to_dict(), other.spelled_out().to_dict()
        may = set(self.MAY_CHANGE)
        if "ensemble" in (self.kd_teacher, other.kd_teacher):
            may.discard("seeds")  # more teachers: another ensemble for every distilled student
        return [k for k in a if k not in may and a[k] != b[k]]

    def train_configs(self) -> Dict[str, TrainConfig]:
        """The :class:`TrainConfig` of each model: ``teacher``, ``student``, ``student_kd``."""
        base = dict(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                    patience=self.patience, schedule=self.schedule,
                    window_stride=self.window_stride, cut_min=self.cut_min,
                    cut_max=self.cut_max, compile=self.compile, loss=self.loss,
                    negatives=self.negatives, sampling=self.sampling)  # fmt: skip
        pairs = [(f"layers.{self.student_layers - 1}", f"layers.{self.teacher_layers - 1}")]
        return {
            "teacher": TrainConfig(**base, cut_prob=self.teacher_cut_prob),
            "student": TrainConfig(**base, cut_prob=self.cut_prob),
            "student_kd": TrainConfig(**base, cut_prob=self.cut_prob, alpha=self.alpha,
                                      temperature=self.temperature,
                                      feature_weight=self.feature_weight, layer_pairs=pairs,
                                      teacher_input=self.kd_teacher_input,
                                      ensemble=self.kd_ensemble,
                                      teacher_cache_mb=self.teacher_cache_mb),
        }  # fmt: skip

    def for_data(self, ds) -> ExperimentConfig:
        """This configuration with ``student_d`` chosen for the data set ``ds`` where it is None:
        the largest multiple of ``student_heads`` up to :data:`STUDENT_MAX_D` whose student has
        at most 1/4 of the teacher's parameters there (the item embeddings count, and their share
        grows with the catalogue: on ml-100k the width is 24, on MovieLens-1M's 3,706 items it is
        smaller). The one place the width is chosen."""
        if self.student_d is not None:
            return self
        teacher = num_parameters(self._model_configs(ds, self.student_heads)["teacher"], ds)
        heads = self.student_heads
        for d in range(STUDENT_MAX_D - STUDENT_MAX_D % heads, 0, -heads):
            if 4 * num_parameters(self._model_configs(ds, d)["student"], ds) <= teacher:
                return dataclasses.replace(self, student_d=d)
        raise ValueError(
            f"no student width <= {STUDENT_MAX_D} (a multiple of student_heads={heads}) keeps the "
            f"student at most 1/4 of the teacher's {teacher:,} parameters on {ds.name}: widen "
            f"the teacher (teacher_d, teacher_layers) or give student_d and fewer student_layers"
        )

    def model_configs(self, ds) -> Dict[str, SPNNConfig]:
        """The :class:`SPNNConfig` of each model on the data set ``ds`` (``student_d`` chosen by
        :meth:`for_data` where it is None)."""
        return self._model_configs(ds, self.for_data(ds).student_d)

    def _model_configs(self, ds, student_d: int) -> Dict[str, SPNNConfig]:
        cfg = self.spelled_out()
        side = cfg.use_side_features
        item_vocab = {n: ds.feature_vocab[n] for n in ds.item_features} if side else {}
        user_vocab = {n: ds.feature_vocab[n] for n in ds.user_features} if side else {}
        common = dict(num_items=ds.log.num_items, item_feature_vocab=item_vocab,
                      user_feature_vocab=user_vocab, backend=cfg.backend)  # fmt: skip
        teacher = SPNNConfig(d_model=cfg.teacher_d, n_layers=cfg.teacher_layers,
                             max_len=cfg.teacher_max_len, n_heads=cfg.teacher_heads,
                             dropout=cfg.teacher_dropout,
                             detector_layers=[f"layers.{cfg.teacher_layers - 1}"], **common)  # fmt: skip
        student = SPNNConfig(d_model=student_d, n_layers=cfg.student_layers,
                             max_len=cfg.max_len, n_heads=cfg.student_heads, dropout=cfg.dropout,
                             **common)  # fmt: skip
        return {"teacher": teacher, "student": student, "student_kd": student}


def num_parameters(mcfg: SPNNConfig, ds) -> int:
    """The parameters of an SPNN of shape ``mcfg`` on the data set ``ds``, counted without
    building its item table: a model's parameters are affine in the catalogue's size (one
    embedding row per item), so two models of 1 and 2 items give the count for any size."""
    V = mcfg.num_items

    def count(items: int) -> int:
        tables = {n: t[: items + 1] for n, t in ds.item_features.items()}
        shape = dataclasses.replace(mcfg, num_items=items)
        return SPNN(shape, tables, ds.user_features).num_parameters()

    # on the meta device: shapes without memory (a model too large for the machine is counted,
    # then refused by the memory check, not built)
    with torch.device("meta"):
        if V <= 2:
            return count(V)
        one, two = count(1), count(2)
    return one + (V - 1) * (two - one)
