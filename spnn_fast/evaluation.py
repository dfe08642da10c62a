"""Full-ranking evaluation of a model on an :class:`~spnn_fast.protocol.EvalSet`."""

from __future__ import annotations

from typing import Sequence

import torch

from spnn_fast.distributed import all_sum, world
from spnn_fast.functional import target_rank
from spnn_fast.metrics import MetricAccumulator
from spnn_fast.model import SPNN
from spnn_fast.protocol import EvalSet, train_ends
from spnn_fast.windows import make_batch

__all__ = ["evaluate"]


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
        # The target's rank among all items without the [rows, V] score matrix; on the CPU the
        # same product as SPNN.score, so the same ranks as ranking its scores.
        target = torch.as_tensor(targets[s : s + batch_size], device=hidden.device)
        ranks = target_rank(hidden, model.item_emb.weight, target, backend=cfg.backend).cpu()
        acc.add(ranks)
    acc.load_state(all_sum(acc.state()))
    model.train(was_training)
    return (acc.compute(), acc.standard_errors()) if with_se else acc.compute()
