"""What a frozen teacher gives each distillation step, computed per batch or read from a cache.

:class:`TeacherOutputs` answers one question per step: the teacher's view
(:data:`~spnn_fast.objective.TeacherView`: hidden states and the outputs of the layers the
distillers read, over the student's columns) of this step's windows. With
``teacher_input="full"`` the teacher reads each window whole, so its view of a window never
changes while the student trains: :class:`TeacherCache` computes it once for every training
window and each step gathers its rows. Otherwise (``"cut"``: the teacher reads the student's own
cut input; or a cache above ``teacher_cache_mb``) the teacher runs on every batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from spnn_fast.config import TrainConfig
from spnn_fast.distributed import world
from spnn_fast.encode import SequenceBatch
from spnn_fast.model import SPNN
from spnn_fast.objective import TeacherView

__all__ = ["TeacherCache", "TeacherOutputs", "teacher_view"]

# (rows, ends) of windows -> their batch, as long as the teacher's window, on the device
BatchFn = Callable[[np.ndarray, np.ndarray], SequenceBatch]


@torch.no_grad()
def teacher_view(teacher: SPNN, b: SequenceBatch, L: int, layers: Sequence[str]) -> TeacherView:
    """The frozen teacher on ``b``: its hidden states and the outputs of ``layers``, over the
    last ``L`` columns (the student's)."""
    out = teacher(b.items, b.timestamps, b.time_buckets, b.mask, b.users,
                  return_layers=tuple(layers))  # fmt: skip
    return out.hidden[:, -L:], {k: v[:, -L:] for k, v in out.layers.items()}


class TeacherCache:
    """The teacher's view of every training window, ``[n, L, d]`` per output, on one device.

    Filled in place (no second copy). Under torch.distributed each rank computes every
    ``size``-th window and the ranks broadcast their shares in turn, so the teacher runs once per
    window in all; :meth:`build` is then a collective that every rank calls at the same step.
    """

    def __init__(self, teacher: SPNN, layers: Sequence[str], n: int, L: int) -> None:
        like = teacher.item_table()
        shape = (n, L, teacher.config.d_model)
        self.hidden = like.new_empty(shape)
        self.layers = {k: like.new_empty(shape) for k in layers}

    @staticmethod
    def nbytes(teacher: SPNN, layers: Sequence[str], n: int, L: int) -> int:
        """Bytes a cache of ``n`` windows of ``L`` columns takes."""
        size = n * L * teacher.config.d_model * (1 + len(layers))
        return size * teacher.item_table().element_size()

    def build(self, teacher: SPNN, windows, batch: BatchFn, batch_size: int) -> TeacherCache:
        rank, size = world()
        rows, ends = windows
        n, L = self.hidden.shape[:2]
        mine = np.arange(rank, n, size)
        for s in range(0, len(mine), batch_size):
            w = mine[s : s + batch_size]
            h, lay = teacher_view(teacher, batch(rows[w], ends[w]), L, tuple(self.layers))
            at = torch.as_tensor(w, device=h.device)
            self.hidden[at] = h
            for k, t in self.layers.items():
                t[at] = lay[k]
        if size > 1:
            for src in range(min(size, n)):
                at = torch.arange(src, n, size, device=self.hidden.device)
                for t in (self.hidden, *self.layers.values()):
                    part = t[at]  # a gathered (contiguous) copy of src's rows
                    dist.broadcast(part, src)
                    if src != rank:
                        t[at] = part
        return self

    def __getitem__(self, idx: Tensor) -> TeacherView:
        return self.hidden[idx], {k: v[idx] for k, v in self.layers.items()}


class TeacherOutputs:
    """The teacher's view of each step's windows (see the module docstring).

    Args:
        teacher: the frozen teacher.
        layers: the teacher layers the distillers read.
        tcfg: the student's training config (``teacher_input``, ``teacher_cache_mb``,
            ``eval_batch_size`` for building the cache).
        windows: ``(rows, ends)`` of every training window (a step names windows by index).
        L: the student's window length (the columns of a view).
        batch: builds the teacher's batch of some windows (see :data:`BatchFn`).
    """

    def __init__(
        self, teacher: SPNN, layers: Sequence[str], tcfg: TrainConfig, windows, L: int,
        batch: BatchFn,
    ) -> None:  # fmt: skip
        self.teacher, self.layers, self.tcfg = teacher, tuple(layers), tcfg
        self.windows, self.L, self.batch = windows, L, batch
        self._cache: Optional[TeacherCache] = None
        n = len(windows[0])
        self.cached = tcfg.teacher_input == "full" and (
            TeacherCache.nbytes(teacher, self.layers, n, L) <= tcfg.teacher_cache_mb * 2**20
        )

    def cache(self) -> Optional[TeacherCache]:
        """The cache of every window's view, built on first use (a collective under
        torch.distributed); None where the teacher runs on every batch."""
        if self.cached and self._cache is None:
            n = len(self.windows[0])
            cache = TeacherCache(self.teacher, self.layers, n, self.L)
            self._cache = cache.build(self.teacher, self.windows, self.batch,
                                      self.tcfg.eval_batch_size)  # fmt: skip
        return self._cache

    def view(self, idx: np.ndarray, full: SequenceBatch, keep: Tensor) -> TeacherView:
        """The view of windows ``idx`` (this rank's share of a step), whose teacher-length batch
        is ``full`` and whose student input keeps the last ``keep[i]`` events of window ``i``."""
        cache = self.cache()
        if cache is not None:
            return cache[torch.as_tensor(idx, device=full.items.device)]
        b = full.cut(keep) if self.tcfg.teacher_input == "cut" else full
        return teacher_view(self.teacher, b, self.L, self.layers)
