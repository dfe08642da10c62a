"""The loss of one training step: plain next-item CE, or distillation from a frozen teacher.

Distillation: the student sees its (possibly cut) window, the teacher a view of the same windows
(:class:`spnn_fast.teacher.TeacherOutputs`): its hidden states and the outputs of the teacher
layers the distillers read. The loss is the fused CE + logit KD
(:func:`spnn_fast.functional.distillation_loss`) plus the knowledge-detector feature loss
(:class:`spnn_fast.nn.FeatureDistiller`) on named (student layer, teacher layer) pairs. A model
with knowledge detectors (a teacher) also trains them with an auxiliary next-item loss.

Every tensor keeps the batch's shape, whatever its targets: a position without one takes part
with the target ``ignore_index`` (which the losses skip without forming its logits) instead of
being selected out, so ``torch.compile`` traces the step whole, without a data-dependent shape.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from spnn_fast.config import TrainConfig
from spnn_fast.distributed import all_sum
from spnn_fast.encode import IGNORE_INDEX, SequenceBatch
from spnn_fast.functional import (
    distillation_loss,
    sampled_distillation_loss,
    sampled_softmax_loss,
)
from spnn_fast.model import SPNN
from spnn_fast.nn import FeatureDistiller

__all__ = ["Objective", "TeacherView"]

# The teachers' view of a batch: each teacher's hidden states [B, L, d] and the outputs of the
# layers the distillers read (of the student's own teacher).
TeacherView = Tuple[List[Tensor], Dict[str, Tensor]]


def _pair_name(s_layer: str, t_layer: str) -> str:
    return f"{s_layer}->{t_layer}".replace(".", "_")  # ModuleDict keys cannot hold "."


def _width(model: SPNN, layer: str) -> int:
    if layer not in model.config.layer_names():
        raise ValueError(f"unknown layer {layer!r}; valid: {model.config.layer_names()}")
    return model.config.d_model


def table_rows(targets: Tensor) -> Tensor:
    """Item ids ``1..V`` as rows of :meth:`SPNN.item_table` (``0..V-1``), IGNORE_INDEX where
    there is no target."""
    return torch.where(targets > 0, targets - 1, IGNORE_INDEX)


def detector_targets(b: SequenceBatch) -> Tuple[Tensor, Tensor, Tensor]:
    """What a knowledge detector learns from in each row: the events it may pool (the window up
    to its last event with a target), that target (<= 0: none) and the rows that have one."""
    last = b.targets[:, -1] > 0
    mask = b.mask.clone()
    mask[~last, -1] = False
    prev = b.targets[:, -2] if b.targets.shape[1] > 1 else b.targets[:, -1]
    y = torch.where(last, b.targets[:, -1], prev)
    return mask, y, (y > 0) & mask.any(1)


class Objective(nn.Module):
    """The model being trained and its loss for one (local) batch.

    A module so that DistributedDataParallel sees every trainable parameter (the student and the
    distillers' student projections); the frozen teacher is held outside the module tree.
    """

    def __init__(
        self,
        model: SPNN,
        tcfg: TrainConfig,
        teacher: Optional[SPNN],
        ensemble: Optional[Sequence[SPNN]] = None,
        log_q: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        self.model, self.tcfg = model, tcfg
        # The sampled loss (tcfg.sampled for the model's catalogue): each step's negatives come
        # with forward(), their log-probabilities here (log_q [V + 1]; None: uniform).
        self.sampled = tcfg.sampled(model.config.num_items)
        self.register_buffer("log_q", log_q, persistent=False)
        if self.sampled and ensemble and len(ensemble) > 1 and tcfg.ensemble != "logits":
            raise ValueError(
                f"the sampled loss learns from an ensemble of teachers through its mean logits "
                f"(ensemble='logits'), not ensemble={tcfg.ensemble!r}: set kd_ensemble logits, "
                f"or loss full"
            )
        self._teacher = [teacher] if teacher is not None else []
        # the logit term's teachers: an ensemble, or the teacher alone (plain lists: frozen
        # models outside the module tree, as the teacher)
        self.logit_teachers = list(ensemble) if ensemble else list(self._teacher)
        pairs = tcfg.layer_pairs if teacher is not None else []
        # the teacher layers the distillers read (a TeacherView holds their outputs)
        self.teacher_layers = tuple(sorted({p[1] for p in pairs}))
        self.student_layers = tuple({p[0] for p in pairs})
        self.distillers = nn.ModuleDict()
        if teacher is not None and teacher.config.num_time_buckets != model.config.num_time_buckets:
            raise ValueError(
                f"teacher and student must share num_time_buckets, got "
                f"{teacher.config.num_time_buckets} and {model.config.num_time_buckets}"
            )
        for s_layer, t_layer in pairs:
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

    def normalizers(self, b: SequenceBatch, device: torch.device) -> Dict[str, Tensor]:
        """Global counts the losses are divided by (summed over ranks, so that N processes take
        the steps one process takes with the same global batch): targets, rows, detector rows,
        each a 0-dim float32 tensor on ``device`` (a tensor, not a number: a compiled step
        takes each batch's counts without compiling again)."""
        aux_rows = detector_targets(b)[2].sum() if self.model.config.detector_layers else 0
        local = torch.tensor(
            [float((b.targets > 0).sum()), float(b.items.shape[0]), float(aux_rows)],
            dtype=torch.float64,
        )
        g = all_sum(local.to(device) if device.type == "cuda" else local).cpu()
        counts = g.clamp(min=1.0).to(device=device, dtype=torch.float32)
        return {"targets": counts[0], "rows": counts[1], "aux": counts[2]}

    def forward(
        self,
        b: SequenceBatch,
        norm: Dict[str, Tensor],
        t_view: Optional[TeacherView] = None,
        negatives: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Dict]:
        """Loss of the student batch ``b`` (``t_view``: the teachers' view of the same windows,
        required with a teacher; its hidden states in the order of ``logit_teachers``;
        ``negatives``: the step's shared negatives [K], required with the sampled loss) and
        its parts, detached."""
        tcfg, model, teacher = self.tcfg, self.model, self.teacher
        det_layers = tuple(model.config.detector_layers)
        out = model(b.items, b.timestamps, b.time_buckets, b.mask, b.users,
                    return_layers=self.student_layers + det_layers)  # fmt: skip
        h, y = out.hidden, table_rows(b.targets)
        stats = {}
        if self.sampled:
            loss = self._sampled_loss(h, b, t_view, negatives)
        elif teacher is None:
            loss = distillation_loss(h, model.item_table(), target=y, alpha=0.0, reduction="sum",
                                     backend=model.config.backend)  # fmt: skip
        else:
            t_h = list(t_view[0])
            t_w = [t.item_table() for t in self.logit_teachers]
            if len(t_h) == 1:  # one teacher: the tensors themselves
                t_h, t_w = t_h[0], t_w[0]
            loss = distillation_loss(
                h, model.item_table(), t_h, t_w, y, temperature=tcfg.temperature,
                alpha=tcfg.alpha, ensemble=tcfg.ensemble, reduction="sum",
                backend=model.config.backend,
            )  # fmt: skip
        loss = loss / norm["targets"]
        stats["ce"] = loss.detach()
        for s_layer, t_layer in tcfg.layer_pairs if teacher is not None else ():
            t_layers = t_view[1]
            name = _pair_name(s_layer, t_layer)
            # FeatureDistiller averages over its local rows; rescale to the global batch.
            fd = self.distillers[name](out.layers[s_layer], t_layers[t_layer], b.mask)
            fd = fd * b.mask.shape[0] / norm["rows"]
            stats[f"feat:{name}"] = fd.detach()
            loss = loss + tcfg.feature_weight * fd
        for layer in det_layers:
            aux = self._detector_loss(model, layer, out.layers[layer], b, negatives) / norm["aux"]
            stats[f"detector:{layer}"] = aux.detach()
            loss = loss + tcfg.detector_weight * aux
        return loss, stats

    def _sampled_loss(self, h: Tensor, b: SequenceBatch, t_view: Optional[TeacherView],
                      negatives: Tensor) -> Tensor:  # fmt: skip
        """The sampled counterpart of the full loss: over each target and the shared negatives,
        on the item tables whose row ``i`` is item ``i`` (the batch's targets as they are)."""
        tcfg, model = self.tcfg, self.model
        kw = dict(log_q=self.log_q, reduction="sum", backend=model.config.backend)
        if self.teacher is None:
            return sampled_softmax_loss(h, model.item_emb.weight, b.targets, negatives, **kw)
        t_h, t_w = list(t_view[0]), [t.item_emb.weight for t in self.logit_teachers]
        if len(t_h) > 1:  # the softmax of the mean logits: one teacher of all their columns
            t_h = [x / len(t_h) for x in t_h]
        return sampled_distillation_loss(
            h, model.item_emb.weight, torch.cat(t_h, -1), torch.cat(t_w, -1), b.targets,
            negatives, temperature=tcfg.temperature, alpha=tcfg.alpha, **kw,
        )  # fmt: skip

    def _detector_loss(
        self, model: SPNN, layer: str, feats: Tensor, b: SequenceBatch,
        negatives: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        """Auxiliary next-item loss that trains a teacher's knowledge detector.

        The detector pools the (detached) layer features over the window up to the last event that
        has a target and predicts that target with the (detached) item table, so it learns which
        positions carry the next item without changing the teacher itself.
        """
        mask, y, ok = detector_targets(b)
        # every row (a row with nothing to pool pools to zeros), the rows without a target ignored
        pooled = model.detector(layer).pool(feats.detach(), mask)
        if self.sampled:
            return sampled_softmax_loss(
                pooled, model.item_emb.weight.detach(), torch.where(ok, y, IGNORE_INDEX),
                negatives, log_q=self.log_q, reduction="sum", backend=model.config.backend,
            )  # fmt: skip
        y = torch.where(ok, y - 1, IGNORE_INDEX)
        return distillation_loss(pooled, model.item_table().detach(), target=y, alpha=0.0,
                                 reduction="sum", backend=model.config.backend)  # fmt: skip
