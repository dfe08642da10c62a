"""Full-ranking evaluation of a model on an :class:`~spnn_fast.protocol.EvalSet`."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from spnn_fast.distributed import all_sum, world
from spnn_fast.functional import target_rank
from spnn_fast.metrics import MetricAccumulator, ranks_from_scores
from spnn_fast.model import SPNN
from spnn_fast.protocol import EvalSet, train_ends
from spnn_fast.reference.distill import LOGIT_BUDGET_BYTES
from spnn_fast.windows import make_batch

__all__ = ["evaluate"]


def _ensemble_ranks(models, hiddens, target, ensemble: str, temperature: float) -> Tensor:
    """Ranks of ``target`` under the ensemble of ``models`` (their last hidden states
    ``hiddens``): ``"logits"`` ranks by the mean logits, one product of the concatenated hidden
    states and item tables, so the fused rank op serves it; ``"distributions"`` by the mean of
    the temperature-softened distributions, which takes each row's scores ``[rows, V + 1]``
    (:func:`evaluate` sizes its row batches so that they stay within the logits budget)."""
    m = len(models)
    tables = [model.item_emb.weight for model in models]
    if ensemble == "logits":
        hidden = torch.cat([h / m for h in hiddens], dim=-1)
        table = torch.cat(tables, dim=-1)
        return target_rank(hidden, table, target, backend=models[0].config.backend)
    log_p = torch.stack(
        [
            torch.log_softmax((h @ w[1:].T).float() / temperature, -1)
            for h, w in zip(hiddens, tables)
        ]
    )
    scores = torch.logsumexp(log_p, dim=0)  # log of the mean, but for log(m): the same ranks
    scores = torch.cat([scores.new_full((scores.shape[0], 1), float("-inf")), scores], dim=1)
    return ranks_from_scores(scores, target)


@torch.no_grad()
def evaluate(
    model: Union[SPNN, Sequence[SPNN]],
    log,
    eval_set: EvalSet,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (5, 10, 20),
    with_se: bool = False,
    ensemble: str = "distributions",
    temperature: float = 1.0,
):
    """Full-ranking HR/NDCG/MRR@K of ``model`` on ``eval_set`` (rows sharded across ranks).

    ``model`` may be a list of models of one shape: their ensemble is evaluated, as ``ensemble``
    combines them (``"distributions"``: the mean of their softmaxes at ``temperature``;
    ``"logits"``: their mean logits). With ``with_se``: ``(metrics, standard_errors)``, the
    second the standard error over rows of each metric (see
    :meth:`~spnn_fast.metrics.MetricAccumulator.standard_errors`).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    rank, size = world()
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    model = models[0]
    cfg = model.config
    if len(models) > 1 and ensemble == "distributions":
        # its rows' scores are formed ([rows, V] per teacher): as many rows as the budget holds
        per_row = 2 * len(models) * (cfg.num_items + 1) * 4
        batch_size = min(batch_size, max(1, LOGIT_BUDGET_BYTES // per_row))
    max_len = min(cfg.max_len, eval_set.max_history or cfg.max_len)
    acc = MetricAccumulator(ks, device=torch.device("cpu"))
    rows, ends, targets = (a[rank::size] for a in (eval_set.rows, eval_set.ends, eval_set.targets))
    t_end = train_ends(log)
    for s in range(0, len(rows), batch_size):
        b = make_batch(log, rows[s : s + batch_size], ends[s : s + batch_size], max_len,
                       cfg.num_time_buckets, t_end).to(device)  # fmt: skip
        hiddens = [m(b.items, b.timestamps, b.time_buckets, b.mask, b.users).hidden[:, -1]
                   for m in models]  # fmt: skip
        target = torch.as_tensor(targets[s : s + batch_size], device=hiddens[0].device)
        if len(models) > 1:
            ranks = _ensemble_ranks(models, hiddens, target, ensemble, temperature)
        else:
            # The target's rank among all items without the [rows, V] score matrix; on the CPU
            # the same product as SPNN.score, so the same ranks as ranking its scores.
            ranks = target_rank(hiddens[0], model.item_emb.weight, target, backend=cfg.backend)
        acc.add(ranks.cpu())
    acc.load_state(all_sum(acc.state()))
    for m, training in zip(models, was_training):
        m.train(training)
    return (acc.compute(), acc.standard_errors()) if with_se else acc.compute()
