"""What the frozen teachers give each distillation step, computed per batch or read from a cache.

:class:`TeacherOutputs` answers one question per step: the teacher's view
(:data:`~spnn_fast.objective.TeacherView`: hidden states and the outputs of the layers the
distillers read, over the student's columns) of this step's windows. With
``teacher_input="full"`` the teacher reads each window whole, so its view of a window never
changes while the student trains: :class:`TeacherCache` computes it once for every training
window and each step gathers its rows. Otherwise (``"cut"``: the teacher reads the student's own
cut input; or a cache over its budget) the teacher runs on every batch. The budget is
``teacher_cache_mb``, or by default a quarter of the memory available on the training device when
training starts (shared by the processes of one machine under torchrun); :attr:`TeacherOutputs.note`
says in one line which way it went and why.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from spnn_fast.config import TrainConfig
from spnn_fast.distributed import all_min, world
from spnn_fast.encode import SequenceBatch
from spnn_fast.model import SPNN
from spnn_fast.objective import TeacherView

__all__ = ["CACHE_SHARE", "TeacherCache", "TeacherOutputs", "available_memory", "cache_budget",
           "teacher_view"]  # fmt: skip

# The share of the memory available on the training device that the teacher cache may take when
# TrainConfig.teacher_cache_mb is None.
CACHE_SHARE = 0.25
_MIB, _GIB = 2**20, 2**30

# (rows, ends) of windows -> their batch, as long as the teacher's window, on the device
BatchFn = Callable[[np.ndarray, np.ndarray], SequenceBatch]


@torch.no_grad()
def teacher_view(
    teachers: Sequence[SPNN], own: int, b: SequenceBatch, L: int, layers: Sequence[str]
) -> TeacherView:
    """The frozen teachers on ``b``: each one's hidden states, and the outputs of ``layers`` of
    ``teachers[own]`` (the one the distillers read), over the last ``L`` columns (the
    student's)."""
    hiddens, outs = [], {}
    for i, teacher in enumerate(teachers):
        out = teacher(b.items, b.timestamps, b.time_buckets, b.mask, b.users,
                      return_layers=tuple(layers) if i == own else ())  # fmt: skip
        hiddens.append(out.hidden[:, -L:])
        if i == own:
            outs = {k: v[:, -L:] for k, v in out.layers.items()}
    return hiddens, outs


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # no such file, or "max" (no limit)
        return None


def _cgroup_room() -> Optional[int]:
    """Bytes the process's memory cgroup still allows (a container's limit), or None."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**62:  # v1 says "none" with 2**63
            return max(cap - used, 0)
    return None


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory free for new tensors on ``device`` now: CUDA's free memory, or on the CPU
    the kernel's MemAvailable (free plus reclaimable page cache), within what the process's
    memory cgroup (a container) still allows; None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    room = _cgroup_room()
    return free if room is None else min(free, room)


def cache_budget(teacher_cache_mb: Optional[float], device: torch.device) -> Tuple[int, str]:
    """(bytes the teacher cache may take, where that figure comes from)."""
    if teacher_cache_mb is not None:
        return int(teacher_cache_mb * _MIB), f"teacher_cache_mb={teacher_cache_mb:g}"
    free = available_memory(device)
    if free is None:
        return 0, f"the free memory of {device} cannot be read; set teacher_cache_mb"
    # the processes of one machine share its memory (each holds the whole cache); a GPU is its own
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) if device.type == "cpu" else 1
    shared = f", shared by {local} processes" if local > 1 else ""
    why = f"{CACHE_SHARE:g} of the {free / _GIB:.1f} GiB available on {device}{shared}"
    return int(free * CACHE_SHARE / local), why


class TeacherCache:
    """The teachers' view of every training window, ``[n, L, d]`` per output, on one device.

    Filled in place (no second copy). Under torch.distributed each rank computes every
    ``size``-th window and the ranks broadcast their shares in turn, so each teacher runs once
    per window in all; :meth:`build` is then a collective that every rank calls at the same step.
    """

    def __init__(self, teachers: Sequence[SPNN], own: int, layers: Sequence[str], n: int,
                 L: int) -> None:  # fmt: skip
        def new(t: SPNN) -> Tensor:
            return t.item_table().new_empty((n, L, t.config.d_model))

        self.hiddens = [new(t) for t in teachers]
        self.layers = {k: new(teachers[own]) for k in layers}

    @staticmethod
    def nbytes(teachers: Sequence[SPNN], own: int, layers: Sequence[str], n: int, L: int) -> int:
        """Bytes a cache of ``n`` windows of ``L`` columns takes."""
        widths = [t.config.d_model for t in teachers] + [teachers[own].config.d_model] * len(layers)
        return n * L * sum(widths) * teachers[own].item_table().element_size()

    def build(self, teachers: Sequence[SPNN], own: int, windows, batch: BatchFn,
              batch_size: int) -> TeacherCache:  # fmt: skip
        rank, size = world()
        rows, ends = windows
        n, L = self.hiddens[0].shape[:2]
        mine = np.arange(rank, n, size)
        for s in range(0, len(mine), batch_size):
            w = mine[s : s + batch_size]
            hiddens, lay = teacher_view(teachers, own, batch(rows[w], ends[w]), L,
                                        tuple(self.layers))  # fmt: skip
            at = torch.as_tensor(w, device=hiddens[0].device)
            for t, h in zip(self.hiddens, hiddens):
                t[at] = h
            for k, t in self.layers.items():
                t[at] = lay[k]
        if size > 1:
            for src in range(min(size, n)):
                at = torch.arange(src, n, size, device=self.hiddens[0].device)
                for t in (*self.hiddens, *self.layers.values()):
                    part = t[at]  # a gathered (contiguous) copy of src's rows
                    dist.broadcast(part, src)
                    if src != rank:
                        t[at] = part
        return self

    def __getitem__(self, idx: Tensor) -> TeacherView:
        return [h[idx] for h in self.hiddens], {k: v[idx] for k, v in self.layers.items()}


class TeacherOutputs:
    """The teachers' view of each step's windows (see the module docstring).

    Args:
        teachers: the frozen teachers of the logit term: one, or an ensemble.
        own: the index of the teacher whose layers the distillers read (the student's own).
        layers: the teacher layers the distillers read.
        tcfg: the student's training config (``teacher_input``, ``teacher_cache_mb``,
            ``eval_batch_size`` for building the cache).
        device: the training device (the cache's budget reads its free memory).
        windows: ``(rows, ends)`` of every training window (a step names windows by index).
        L: the student's window length (the columns of a view).
        batch: builds the teachers' batch of some windows (see :data:`BatchFn`).
    """

    def __init__(
        self, teachers: Sequence[SPNN], own: int, layers: Sequence[str], tcfg: TrainConfig,
        windows, L: int, batch: BatchFn, device: Union[str, torch.device] = "cpu",
    ) -> None:  # fmt: skip
        self.teachers, self.own, self.layers, self.tcfg = list(teachers), own, tuple(layers), tcfg
        self.windows, self.L, self.batch = windows, L, batch
        self._cache: Optional[TeacherCache] = None
        n = len(windows[0])
        if tcfg.teacher_input != "full":
            self.cached = False
            self.note = (f"the teacher runs on every batch: it reads the student's own cut "
                         f"input (teacher_input={tcfg.teacher_input!r})")  # fmt: skip
            return
        need = TeacherCache.nbytes(self.teachers, own, self.layers, n, L)
        budget, why = cache_budget(tcfg.teacher_cache_mb, torch.device(device))
        if world()[1] > 1:  # one decision for all ranks: the cache's build is a collective
            budget = int(all_min(torch.tensor(float(budget), dtype=torch.float64,
                                              device=device)).item())  # fmt: skip
            why += ", the least over the ranks"
        self.cached = need <= budget
        size = f"its outputs on the {n:,} training windows take {need / _MIB:,.0f} MiB"
        if self.cached:
            self.note = (
                f"the teacher's outputs are cached: {size}, within {budget / _MIB:,.0f} MiB ({why})"
            )
        else:
            self.note = (f"the teacher runs on every batch: {size}, over the {budget / _MIB:,.0f} "
                         f"MiB allowed ({why}; --teacher-cache-mb sets it)")  # fmt: skip

    def cache(self) -> Optional[TeacherCache]:
        """The cache of every window's view, built on first use (a collective under
        torch.distributed); None where the teachers run on every batch."""
        if self.cached and self._cache is None:
            n = len(self.windows[0])
            cache = TeacherCache(self.teachers, self.own, self.layers, n, self.L)
            self._cache = cache.build(self.teachers, self.own, self.windows, self.batch,
                                      self.tcfg.eval_batch_size)  # fmt: skip
        return self._cache

    def view(self, idx: np.ndarray, full: SequenceBatch, keep: Tensor) -> TeacherView:
        """The view of windows ``idx`` (this rank's share of a step), whose teacher-length batch
        is ``full`` and whose student input keeps the last ``keep[i]`` events of window ``i``."""
        cache = self.cache()
        if cache is not None:
            return cache[torch.as_tensor(idx, device=full.items.device)]
        b = full.cut(keep) if self.tcfg.teacher_input == "cut" else full
        return teacher_view(self.teachers, self.own, b, self.L, self.layers)
