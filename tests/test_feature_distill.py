"""feature_distillation_loss (Triton kernel vs reference), KnowledgeDetector, FeatureDistiller."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import DEVICE, assert_close, check_compiled, kernel_stats, needs_triton

import spnn_fast.functional as SF
import spnn_fast.nn as snn
from spnn_fast.reference.feature_distill import feature_distillation_loss_reference

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def make_emb(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * 3 + 1
    t = torch.randn(n, k, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)


def loss_and_grad(s, t, w, out_sum=False, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = (
        SF.feature_distillation_loss(s, t, w, **kw)
        if kw
        else feature_distillation_loss_reference(s, t, w)
    )
    (out * 0.75).backward()
    assert t.grad is None and w.grad is None, "only student_emb may get a gradient"
    return out.detach(), s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, k", [(1, 1), (7, 16), (129, 64), (33, 100), (5, 1000)])
def test_matches_reference(backend, n, k):
    s, t, w = make_emb(n, k, seed=n + k)
    got = loss_and_grad(s, t, w, backend=backend)
    want = loss_and_grad(s.double(), t.double(), w.double())
    assert_close(got[0], want[0], "loss")
    assert_close(got[1], want[1], "d_student_emb")


def test_reference_is_plain_layer_norm():
    s, t, w = make_emb(9, 12, dtype=torch.float64)
    want = (w * (F.layer_norm(s, (12,)) - F.layer_norm(t, (12,))).pow(2).sum(-1)).sum()
    assert_close(feature_distillation_loss_reference(s, t, w), want, "loss", rtol=1e-12, atol=1e-14)


def test_gradcheck_torch_path():
    s, t, w = make_emb(6, 5, dtype=torch.float64)
    s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: SF.feature_distillation_loss(x, t, w, backend="torch"), (s,)
    )


@needs_triton
def test_triton_expanded_grad_and_eps():
    s, t, w = make_emb(20, 24)
    s1 = s.clone().requires_grad_()
    s2 = s.double().clone().requires_grad_()
    out = SF.feature_distillation_loss(s1, t, w, eps=1e-2, backend="triton")
    out.backward()  # the op sees an expanded gradient from the sum
    ref = feature_distillation_loss_reference(s2, t.double(), w.double(), eps=1e-2)
    ref.backward()
    assert_close(out, ref, "loss")
    assert_close(s1.grad, s2.grad, "d_student_emb")


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_rows_are_finite(backend):
    """A constant row has zero variance: layer norm maps it to 0 (eps keeps it finite)."""
    s, t, w = make_emb(4, 8)
    s[1] = 5.0
    out, grad = loss_and_grad(s, t, w, backend=backend)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs(backend):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter computes half precision wrongly; checked on the GPU")
    for dtype in (torch.bfloat16, torch.float16):
        s, t, w = make_emb(33, 64, dtype=dtype)
        got = loss_and_grad(s, t, w, backend=backend)
        want = loss_and_grad(s.double(), t.double(), w.double())
        assert_close(got[0], want[0], f"{dtype} loss", rtol=1e-3, atol=1e-3)
        assert_close(got[1], want[1], f"{dtype} grad", rtol=2e-2, atol=1e-2)


def _bad_cases():
    s, t, w = make_emb(4, 8)
    return [
        ((s, t[:, :7], w), "student_emb and teacher_emb"),
        ((s, t[:3], w), "student_emb and teacher_emb"),
        ((s[0], t, w), "student_emb must be 2-D"),
        ((s, t.double(), w), "differ in dtype"),
        ((s, t, w[:3]), r"weights must be \[N=4\]"),
        ((s, t, w.long()), "weights must be a float tensor"),
        ((s.int(), t, w), "float16/bfloat16/float32/float64"),
        ((s, t.to("meta"), w), "different devices"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises(case):
    args, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        SF.feature_distillation_loss(*args, backend="torch")


@needs_triton
def test_triton_rejects_what_it_cannot_run():
    s, t, w = make_emb(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):  # backend names are case-insensitive
        SF.feature_distillation_loss(s, t, w, backend="Triton")
    SF.feature_distillation_loss(s, t, w, backend="auto")  # falls back to torch


def test_bad_eps_and_backend():
    s, t, w = make_emb(4, 8)
    with pytest.raises(ValueError, match="eps"):
        SF.feature_distillation_loss(s, t, w, eps=0.0)
    with pytest.raises(ValueError, match="does not apply"):
        SF.feature_distillation_loss(s, t, w, backend="cpp")


@needs_triton
def test_opcheck():
    import spnn_fast.ops.feature_distill  # noqa: F401  (registers the op)

    s, t, w = make_emb(9, 24)
    torch.library.opcheck(
        torch.ops.spnn_fast.feature_distill_rows.default, (s.requires_grad_(), t, w, 1e-5)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    s, t, w = make_emb(9, 24)
    fn = lambda x: SF.feature_distillation_loss(x, t, w, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out1, out2 = compiled(x1), fn(x2)
    out1.backward()
    out2.backward()
    assert_close(out1, out2, "loss", rtol=1e-6, atol=1e-7)
    assert_close(x1.grad, x2.grad, "grad", rtol=1e-6, atol=1e-7)


# --- KnowledgeDetector -------------------------------------------------------------------------


def _mask(b, seq_len, lengths):
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


def test_detector_weights_softmax_over_real_positions():
    torch.manual_seed(0)
    det = snn.KnowledgeDetector(12, d_hidden=8)
    feats = torch.randn(3, 6, 12)
    mask = _mask(3, 6, [6, 2, 0])
    a = det.weights(feats, mask)
    assert torch.isfinite(a).all()
    assert torch.equal(a[~mask], torch.zeros_like(a[~mask]))
    assert_close(a.sum(-1), torch.tensor([1.0, 1.0, 0.0]), "row sums")
    s = det.scores(feats)
    assert_close(a[1, :2], torch.softmax(s[1, :2], -1), "softmax of the real positions")
    pooled = det.pool(feats, mask)
    assert_close(pooled, (a[..., None] * feats).sum(1), "pool")
    assert "d_teacher=12" in repr(det)


def test_detector_can_be_trained_through_pool():
    det = snn.KnowledgeDetector(12, d_hidden=8)
    feats = torch.randn(2, 5, 12)
    det.pool(feats, _mask(2, 5, [5, 3])).pow(2).sum().backward()
    assert det.proj.weight.grad is not None and det.score.weight.grad.abs().sum() > 0


# --- FeatureDistiller --------------------------------------------------------------------------


def _distiller_inputs(b=3, seq_len=7, ds=10, dt=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, seq_len, ds, generator=g)
    t = torch.randn(b, seq_len, dt, generator=g)
    return s.to(DEVICE), t.to(DEVICE), _mask(b, seq_len, [seq_len, 4, 1][:b]).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_matches_plain_torch(backend):
    torch.manual_seed(0)
    dist = snn.FeatureDistiller(10, 14, d_knowledge=16, backend=backend).to(DEVICE)
    s, t, mask = _distiller_inputs()
    got = dist(s, t, mask)
    a = dist.detector.weights(t, mask)
    e_s = F.layer_norm(s @ dist.student_proj.weight.T + dist.student_proj.bias, (16,))
    e_t = F.layer_norm(t @ dist.teacher_proj.weight.T, (16,))
    want = (a * (e_s - e_t).pow(2).sum(-1)).sum() / s.shape[0]
    assert_close(got, want, "FeatureDistiller loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_gradients_reach_only_the_student(backend):
    det = snn.KnowledgeDetector(14)
    dist = snn.FeatureDistiller(10, 14, d_knowledge=16, detector=det, backend=backend).to(DEVICE)
    assert dist.detector is det and not any(p.requires_grad for p in det.parameters())
    s, t, mask = _distiller_inputs()
    s.requires_grad_()
    t.requires_grad_()
    dist(s, t, mask).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert dist.student_proj.weight.grad is not None
    assert t.grad is None
    assert dist.teacher_proj.weight.grad is None and not dist.teacher_proj.weight.requires_grad
    assert all(p.grad is None for p in det.parameters())
    trainable = {n for n, p in dist.named_parameters() if p.requires_grad}
    assert trainable == {"student_proj.weight", "student_proj.bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_ignores_padding(backend):
    dist = snn.FeatureDistiller(10, 14, d_knowledge=16, backend=backend).to(DEVICE)
    s, t, mask = _distiller_inputs()
    base = dist(s, t, mask)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100.0 * torch.randn_like(s2[~mask])
    t2[~mask] = -50.0
    assert_close(dist(s2, t2, mask), base, "loss with changed padding", rtol=1e-6, atol=1e-7)
    empty = torch.zeros_like(mask)
    assert dist(s, t, empty).item() == 0.0


def test_distiller_teacher_projection_is_orthogonal():
    dist = snn.FeatureDistiller(10, 40, d_knowledge=16)
    w = dist.teacher_proj.weight  # [16, 40]: orthonormal rows
    assert_close(w @ w.T, torch.eye(16), "W W^T", atol=1e-5)
    assert "d_knowledge=16" in repr(dist)


def test_distiller_bad_input():
    dist = snn.FeatureDistiller(10, 14, d_knowledge=16).to(DEVICE)
    s, t, mask = _distiller_inputs()
    with pytest.raises(ValueError, match="student_feats"):
        dist(s[..., :9], t, mask)
    with pytest.raises(ValueError, match="teacher_feats"):
        dist(s, t[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        dist(s, t, mask.float())
    with pytest.raises(ValueError, match="detector"):
        snn.FeatureDistiller(10, 14, detector=snn.KnowledgeDetector(13))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B, L\].*got NoneType"):
        dist(s, t, None)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B, L\].*got NoneType"):
        dist.detector(t, None)
    with pytest.raises(TypeError, match="FeatureDistiller: d_knowledge must be an int, got float"):
        snn.FeatureDistiller(10, 14, d_knowledge=16.0)
    with pytest.raises(TypeError, match="KnowledgeDetector: d_hidden must be an int, got bool"):
        snn.KnowledgeDetector(14, d_hidden=True)
    with pytest.raises(TypeError, match="detector must be a KnowledgeDetector, got Linear"):
        snn.FeatureDistiller(10, 14, detector=torch.nn.Linear(14, 1))


# --- without a GPU: compile the kernels for sm_90 (catches what the interpreter does not) -------


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_kernels_compile_for_sm90_as_launched(tmp_path):
    """Both kernels compiled to sm_90 cubins as launched, up to K = 8192 (a whole row in
    registers): no spills, shared memory within the limit."""
    records = kernel_stats(tmp_path, "all", "feature")
    check_compiled(records, ("feature_distill_fwd", "feature_distill_bwd"), {"bf16"})
    assert {r["config"]["K"] for r in records} == {64, 8192}
