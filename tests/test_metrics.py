import math

import numpy as np
import pytest
import torch

import spnn_fast.metrics as metrics
from spnn_fast.metrics import MetricAccumulator, rank_metrics, ranks_from_scores


def _ranks_loop(scores: torch.Tensor, targets: torch.Tensor) -> list:
    """Rank by the definition, one row at a time: 1 + #{v in 1..V, v != t : s_v >= s_t}."""
    out = []
    for row, t in zip(scores.tolist(), targets.tolist()):
        out.append(1 + sum(1 for v in range(1, len(row)) if v != t and row[v] >= row[t]))
    return out


def test_ranks_hand():
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.3, 0.2],  # target 2 is best -> 1
            [9.0, 0.1, 0.5, 0.3, 0.2],  # target 1 is worst -> 4
            [9.0, 0.1, 0.5, 0.3, 0.2],  # target 4: 0.5, 0.3 above -> 3
        ]
    )
    ranks = ranks_from_scores(scores, torch.tensor([2, 1, 4]))
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [1, 4, 3]


def test_ties_count_against_target():
    v = 7
    const = torch.zeros(3, v + 1)
    assert ranks_from_scores(const, torch.tensor([1, 4, 7])).tolist() == [v, v, v]
    s = torch.tensor([[0.0, 1.0, 2.0, 2.0, 2.0, 0.5]])
    # target 3 ties with items 2 and 4: both count against it.
    assert ranks_from_scores(s, torch.tensor([3])).tolist() == [3]
    assert ranks_from_scores(s, torch.tensor([1])).tolist() == [4]


def test_padding_column_ignored():
    s = torch.tensor([[1e9, 0.1, 0.2, 0.3], [float("nan"), 0.3, 0.2, 0.1]])
    assert ranks_from_scores(s, torch.tensor([3, 1])).tolist() == [1, 1]
    s = torch.tensor([[-float("inf"), 0.1, 0.2, 0.3]])
    assert ranks_from_scores(s, torch.tensor([1])).tolist() == [3]


@pytest.mark.parametrize("m,v", [(1, 1), (7, 5), (129, 33)])
def test_ranks_match_definition(m, v, monkeypatch):
    g = torch.Generator().manual_seed(m * 100 + v)
    scores = torch.randint(0, 4, (m, v + 1), generator=g).float()  # many ties
    targets = torch.randint(1, v + 1, (m,), generator=g)
    expected = _ranks_loop(scores, targets)
    assert ranks_from_scores(scores, targets).tolist() == expected
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 2 * v)  # blocks of 2 rows
    assert ranks_from_scores(scores, targets).tolist() == expected
    assert ranks_from_scores(scores.to(torch.bfloat16), targets).tolist() == expected
    assert ranks_from_scores(scores.numpy(), targets.numpy()).tolist() == expected


def test_ranks_errors():
    s = torch.rand(2, 5)
    with pytest.raises(ValueError, match="NaN.*row 1"):
        bad = s.clone()
        bad[1, 3] = float("nan")
        ranks_from_scores(bad, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[1, 4\].*\[0, 2\]"):
        ranks_from_scores(s, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[1, 4\].*\[1, 5\]"):
        ranks_from_scores(s, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="targets must be"):
        ranks_from_scores(s, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="scores must be"):
        ranks_from_scores(torch.rand(5), torch.tensor([1]))
    with pytest.raises(ValueError, match="scores must be"):
        ranks_from_scores(torch.rand(2, 1), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="floating"):
        ranks_from_scores(torch.ones(2, 5, dtype=torch.int64), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        ranks_from_scores(s, torch.tensor([1.0, 2.0]))
    assert ranks_from_scores(torch.rand(0, 5), torch.zeros(0, dtype=torch.int64)).numel() == 0


def test_rank_metrics_hand():
    got = rank_metrics(torch.tensor([1, 2, 11, 25]))
    l3, l12 = math.log2(3), math.log2(12)
    expected = {
        "HR@5": 2 / 4,
        "HR@10": 2 / 4,
        "HR@20": 3 / 4,
        "NDCG@5": (1 + 1 / l3) / 4,
        "NDCG@10": (1 + 1 / l3) / 4,
        "NDCG@20": (1 + 1 / l3 + 1 / l12) / 4,
        "MRR@5": (1 + 1 / 2) / 4,
        "MRR@10": (1 + 1 / 2) / 4,
        "MRR@20": (1 + 1 / 2 + 1 / 11) / 4,
    }
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # boundary: rank == K counts, rank == K + 1 does not
    edge = rank_metrics([5, 6], ks=(5,))
    assert edge == pytest.approx(
        {"HR@5": 0.5, "NDCG@5": 0.5 / math.log2(6), "MRR@5": 0.5 / 5}, abs=1e-12
    )


def test_accumulator_streaming_and_merge():
    rng = np.random.default_rng(1)
    ranks = rng.integers(1, 40, 101)
    whole = rank_metrics(ranks)
    acc = MetricAccumulator()
    for chunk in np.array_split(ranks, 7):
        acc.add(torch.from_numpy(chunk))
    assert acc.count == 101
    assert acc.compute() == pytest.approx(whole, abs=1e-12)
    # two shards gathered by summing their states, as all_reduce would
    a, b = MetricAccumulator(), MetricAccumulator()
    a.add(ranks[:30])
    b.add(ranks[30:])
    state = a.state() + b.state()
    assert state.dtype == torch.float64 and state.shape == (19,)
    gathered = MetricAccumulator()
    gathered.load_state(state)
    assert gathered.compute() == pytest.approx(whole, abs=1e-12)
    assert a.merge(b).compute() == pytest.approx(whole, abs=1e-12)
    # standard errors: the sample sd of the per-row values over sqrt(n), from the gathered sums
    r = ranks.astype(np.float64)
    se = gathered.standard_errors()
    for k in (5, 10, 20):
        per_row = {"HR": (r <= k) * 1.0, "NDCG": (r <= k) / np.log2(r + 1), "MRR": (r <= k) / r}
        for name, x in per_row.items():
            expected = x.std(ddof=1) / np.sqrt(len(x))
            assert se[f"{name}@{k}"] == pytest.approx(expected, rel=1e-9)
    one = MetricAccumulator()
    one.add(torch.tensor([3]))
    assert set(one.standard_errors().values()) == {0.0}
    a.reset()
    with pytest.raises(ValueError, match="no ranks"):
        a.compute()


def test_accumulator_errors():
    acc = MetricAccumulator(ks=(1, 3))
    assert acc.keys == ("HR@1", "HR@3", "NDCG@1", "NDCG@3", "MRR@1", "MRR@3")
    with pytest.raises(ValueError, match="1-based"):
        acc.add(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        acc.add(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        acc.load_state(torch.zeros(3))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(MetricAccumulator())
    for ks in ((), (0,), (5, 5), (2.5,)):
        with pytest.raises(ValueError, match="ks"):
            MetricAccumulator(ks)
