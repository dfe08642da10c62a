"""Weighted squared distance between layer-normed embeddings (Triton).

Math, per row i of student_emb s [N, K], teacher_emb t [N, K], weights w [N]::

    ln(x) = (x - mean(x)) / sqrt(var(x) + eps)        (over K, no affine; biased variance)
    loss_i = w_i * ||ln(s_i) - ln(t_i)||^2

* ``_feature_distill_fwd_kernel``: grid over blocks of BLOCK_N rows, the whole row (BLOCK_K, a
  power of two >= K) in registers; writes loss [N] (fp32). The sum over rows is taken by the op.
* ``_feature_distill_bwd_kernel``: with a = ln(s_i), b = ln(t_i), r = 1/sqrt(var(s_i) + eps),
  ga = 2 g_i w_i (a - b): d s_i = r * (ga - mean(ga) - a * mean(ga * a)). Only the student gets a
  gradient. Recomputes the statistics instead of saving them.

K <= 8192. fp32 arithmetic for every input dtype. Checked against
``spnn_fast.reference.feature_distill.feature_distillation_loss_reference`` in
tests/test_feature_distill.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spnn_fast.limits import FEATURE_MAX_K

__all__ = ["MAX_K", "feature_distill_bwd", "feature_distill_fwd"]

MAX_K = FEATURE_MAX_K


@triton.jit
def _layer_norm_rows(X, rows, row_ok, offs_k, K, eps):
    mask = row_ok[:, None] & (offs_k[None, :] < K)
    x = tl.load(X + rows[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _normed_rows(S, T, W, N, K, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows: ln(s) and its 1/std, ln(t), and the weights (fp32)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    a, rstd = _layer_norm_rows(S, rows, row_ok, offs_k, K, eps)
    b, _ = _layer_norm_rows(T, rows, row_ok, offs_k, K, eps)
    w = tl.load(W + rows, mask=row_ok, other=0.0).to(tl.float32)
    return rows, row_ok, offs_k, a, rstd, b, w


@triton.jit(do_not_specialize=["N"])
def _feature_distill_fwd_kernel(
    S, T, W, LOSS, N, K, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows, row_ok, offs_k, a, _, b, w = _normed_rows(S, T, W, N, K, eps, BLOCK_N, BLOCK_K)
    d = a - b
    tl.store(LOSS + rows, w * tl.sum(d * d, axis=1), mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _feature_distill_bwd_kernel(
    G, S, T, W, DS, N, K, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows, row_ok, offs_k, a, rstd, b, w = _normed_rows(S, T, W, N, K, eps, BLOCK_N, BLOCK_K)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    ga = (2.0 * g * w)[:, None] * (a - b)  # 0 at padded columns, where a = b = 0
    mean_ga = tl.sum(ga, axis=1) / K
    mean_gaa = tl.sum(ga * a, axis=1) / K
    ds = rstd[:, None] * (ga - mean_ga[:, None] - a * mean_gaa[:, None])
    mask = row_ok[:, None] & (offs_k[None, :] < K)
    tl.store(DS + rows[:, None] * K + offs_k[None, :], ds.to(DS.dtype.element_ty), mask=mask)


def _config(k: int):
    block_k = max(16, triton.next_power_of_2(k))
    block_n = max(1, min(64, 4096 // block_k))
    warps = 4 if block_k <= 1024 else 8
    return block_n, block_k, warps


def _check(s: torch.Tensor) -> None:
    if s.shape[1] > MAX_K:
        raise ValueError(
            f"student_emb has K={s.shape[1]} features; the Triton kernel takes <= {MAX_K}"
        )


def feature_distill_fwd(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, weights: torch.Tensor, eps: float
) -> torch.Tensor:
    """Row losses [N] (fp32)."""
    _check(student_emb)
    s, t, w = student_emb.contiguous(), teacher_emb.contiguous(), weights.contiguous()
    n, k = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss
    block_n, block_k, warps = _config(k)
    _feature_distill_fwd_kernel[(triton.cdiv(n, block_n),)](
        s, t, w, loss, n, k, eps, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
    )
    return loss


def feature_distill_bwd(
    grad_rows: torch.Tensor,
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    weights: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """d student_emb for ``grad_rows`` [N] on the row losses (same dtype as student_emb)."""
    _check(student_emb)
    s, t, w = student_emb.contiguous(), teacher_emb.contiguous(), weights.contiguous()
    g = grad_rows.to(torch.float32).contiguous()  # may arrive expanded with stride 0
    n, k = s.shape
    ds = torch.empty_like(s)
    if n == 0:
        return ds
    block_n, block_k, warps = _config(k)
    _feature_distill_bwd_kernel[(triton.cdiv(n, block_n),)](
        g, s, t, w, ds, n, k, eps, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
    )
    return ds
