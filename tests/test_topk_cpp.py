"""The C++ row scans of the top-k and rank CPU path (spnn_fast._C.topk_rows / rank_rows) against
the full-score references, ties, exclusions and padding included, and the public ops through them
(at any catalogue size, by lowering the size they take over from)."""

from __future__ import annotations

import pytest
import torch

import spnn_fast.functional as SF
from spnn_fast import _ext
from spnn_fast.reference import topk as R

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"spnn_fast._C did not load: {_ext.ERROR}")


def _case(n, v, seed, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 8, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(v, 8, generator=g, dtype=torch.float64).to(dtype)
    if ties:  # few distinct scores: ties everywhere, at the cut too
        h = h.round()
        w = (w * 0.5).round()
    lens = torch.randint(0, max(1, v // 3), (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    ids = torch.randint(0, v, (int(offsets[-1]),), generator=g)
    return h, w, offsets, ids


# 37 and 300 columns: the narrow rows' extraction (one and two groups of 16 blocks); 9000: the
# wide rows' scans, k < 32 (row_scan) and k >= 32 (row_gather)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("pad", [0, 5, None])
@pytest.mark.parametrize("v, k", [(37, 1), (37, 7), (37, 30), (300, 12), (9000, 7), (9000, 40)])
def test_topk_rows_is_the_reference(dtype, ties, pad, v, k):
    h, w, offsets, ids = _case(23, v, seed=k, ties=ties, dtype=dtype)
    z = h @ w.T
    want = R.topk_scores_reference(h, w, k, offsets, ids, padding_idx=pad)
    fill = R.empty_id(pad)
    for threads in (1, 3):
        v, i = _ext.C.topk_rows(z.numpy(), k, offsets.numpy(), ids.numpy(),
                                -1 if pad is None else pad, fill, threads)  # fmt: skip
        assert torch.equal(torch.from_numpy(i), want[1]), threads
        assert torch.equal(torch.from_numpy(v), want[0].to(dtype)), threads


def _rule(z, k, offsets, ids, pad, fill):
    """The scans' definition, row by row: admissible columns (not the padding, not excluded, a
    score above -inf, NaN never), by descending score and then the lower column."""
    vals, cols = [], []
    for n, row in enumerate(z.tolist()):
        banned = set(ids[offsets[n] : offsets[n + 1]].tolist()) | {pad}
        ok = [(-x, c) for c, x in enumerate(row) if c not in banned and x > float("-inf")]
        best = sorted(ok)[:k]
        best += [(float("inf"), fill)] * (k - len(best))
        vals.append([-x for x, _ in best])
        cols.append([c for _, c in best])
    return torch.tensor(vals, dtype=z.dtype), torch.tensor(cols)


@pytest.mark.parametrize("v, k", [(1, 1), (15, 4), (16, 16), (17, 3), (300, 50), (9000, 5),
                                  (9000, 33)])  # fmt: skip
def test_topk_rows_on_scores_no_product_gives(v, k):
    """NaN, +-inf, rows of one repeated score, rows whose every column is excluded."""
    g = torch.Generator().manual_seed(v + k)
    n = 9
    z = torch.randn(n, v, generator=g).round()
    z[0] = 2.0  # one score everywhere
    z[1, :: max(1, v // 5)] = float("nan")
    z[2, 1::3] = float("inf")
    z[3, ::2] = float("-inf")
    z[4] = float("-inf")
    z[5, -1] = float("inf")
    lens = torch.randint(0, max(1, v // 2), (n,), generator=g)
    lens[6] = v  # every column excluded
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    ids = torch.randint(0, v, (int(offsets[-1]),), generator=g)
    ids[offsets[6] : offsets[7]] = torch.arange(v)
    for pad in (0, -1):
        want = _rule(z, k, offsets, ids, pad, 7)
        for threads in (1, 2):
            got = _ext.C.topk_rows(z.numpy(), k, offsets.numpy(), ids.numpy(), pad, 7, threads)
            assert torch.equal(torch.from_numpy(got[1]), want[1]), (pad, threads)
            assert torch.equal(torch.from_numpy(got[0]), want[0]), (pad, threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pad", [0, None])
def test_rank_rows_is_the_reference(dtype, pad):
    h, w, _, _ = _case(31, 40, seed=2, ties=True, dtype=dtype)
    lo = 0 if pad is None else 1
    target = torch.randint(lo, 40, (31,), generator=torch.Generator().manual_seed(1))
    want = R.target_rank_reference(h, w, target, padding_idx=pad)
    got = _ext.C.rank_rows((h @ w.T).numpy(), target.numpy(), -1 if pad is None else pad, 2)
    assert torch.equal(torch.from_numpy(got), want)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("through", ["threads", "torch"])
def test_public_ops_through_the_scans(ties, through, monkeypatch):
    if through == "threads":  # the scans' threads, even on small matrices
        monkeypatch.setattr(R, "_ONE_THREAD_BELOW", 0)
    else:  # torch's ops, as where the extension did not load
        monkeypatch.setattr(_ext, "C", None)
    h, w, offsets, ids = _case(17, 29, seed=9, ties=ties)
    ids = ids.clamp(min=1)  # padding row 0 is not an item
    want = R.topk_scores_reference(h, w, 6, offsets, ids)
    got = SF.topk_scores(h, w, 6, exclude=(offsets, ids), backend="torch")
    assert torch.equal(got.indices, want[1]) and torch.equal(got.values, want[0])
    target = torch.randint(1, 29, (17,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(SF.target_rank(h, w, target, backend="torch"),
                       R.target_rank_reference(h, w, target))  # fmt: skip


def test_scans_check_what_they_read():
    z = torch.zeros(3, 5).numpy()
    off = torch.tensor([0, 1, 2, 3]).numpy()
    with pytest.raises(ValueError, match="ids must be columns of scores"):
        _ext.C.topk_rows(z, 2, off, torch.tensor([0, 9, 1]).numpy(), 0, 0, 1)
    with pytest.raises(ValueError, match="offsets must run from 0 to len"):
        _ext.C.topk_rows(z, 2, off, torch.tensor([0, 1]).numpy(), 0, 0, 1)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        _ext.C.topk_rows(z, 2, torch.tensor([0, 2, 1, 3]).numpy(),
                         torch.tensor([0, 1, 2]).numpy(), 0, 0, 1)  # fmt: skip
    with pytest.raises(ValueError, match="target must be columns of scores"):
        _ext.C.rank_rows(z, torch.tensor([0, 5, 1]).numpy(), 0, 1)
    with pytest.raises(TypeError):  # a non-contiguous score matrix is refused, not copied
        _ext.C.rank_rows(torch.zeros(5, 3).T.numpy(), torch.tensor([0, 1, 1]).numpy(), 0, 1)
