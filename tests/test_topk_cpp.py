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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("pad", [0, 5, None])
@pytest.mark.parametrize("k", [1, 7, 30])
def test_topk_rows_is_the_reference(dtype, ties, pad, k):
    h, w, offsets, ids = _case(23, 37, seed=k, ties=ties, dtype=dtype)
    z = h @ w.T
    want = R.topk_scores_reference(h, w, k, offsets, ids, padding_idx=pad)
    fill = R.empty_id(pad)
    for threads in (1, 3):
        v, i = _ext.C.topk_rows(z.numpy(), k, offsets.numpy(), ids.numpy(),
                                -1 if pad is None else pad, fill, threads)  # fmt: skip
        assert torch.equal(torch.from_numpy(i), want[1]), threads
        assert torch.equal(torch.from_numpy(v), want[0].to(dtype)), threads


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
def test_public_ops_through_the_scans(ties, monkeypatch):
    monkeypatch.setattr(R, "_CPP_TOPK_FROM", 0)
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
