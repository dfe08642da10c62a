"""torch.compile (Inductor) of the losses over inputs in any layout: a transposed item table (a
tied ``Linear`` weight read as ``weight.t()``) or transposed hidden states. Inductor checks every
custom op's outputs against the strides its fake gives; the gradients of the losses' backward ops
are contiguous whatever their inputs' strides, and the fakes say so."""

import pytest
import torch

import spnn_fast.functional as F

C, D, N = 9, 5, 6


def _inputs(transposed_hidden: bool):
    g = torch.Generator().manual_seed(0)
    if transposed_hidden:
        x = torch.randn(D, N, generator=g).t().requires_grad_()
    else:
        x = torch.randn(N, D, generator=g).requires_grad_()
    table_dc = torch.randn(D, C, generator=g).requires_grad_()  # the table is table_dc.t()
    y = torch.tensor([1, 2, 3, -100, 8, 4])  # one ignored row: the ops compact the counted rows
    neg = torch.tensor([4, 5, 2, 7])
    t_x = torch.randn(N, 7, generator=g)
    t_w = torch.randn(7, C, generator=g).t()  # the teacher's table transposed too
    return x, table_dc, y, neg, t_x, t_w


LOSSES = {
    "linear_cross_entropy": lambda x, w, y, neg, tx, tw: F.linear_cross_entropy(x, w.t(), y),
    "distillation_loss": lambda x, w, y, neg, tx, tw: F.distillation_loss(
        x, w.t(), tx, tw, y, temperature=2.0, alpha=0.5
    ),
    "distillation_loss_ensemble": lambda x, w, y, neg, tx, tw: F.distillation_loss(
        x, w.t(), [tx, tx * 0.5], [tw, tw], y, temperature=2.0, alpha=0.5
    ),
    "sampled_softmax_loss": lambda x, w, y, neg, tx, tw: F.sampled_softmax_loss(x, w.t(), y, neg),
    "sampled_distillation_loss": lambda x, w, y, neg, tx, tw: F.sampled_distillation_loss(
        x, w.t(), tx, tw, y, neg, temperature=2.0, alpha=0.5
    ),
}


@pytest.mark.parametrize("transposed_hidden", [False, True], ids=["hidden", "hidden_t"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_inductor_transposed_inputs(name, transposed_hidden):
    torch._dynamo.reset()
    x, w, y, neg, tx, tw = _inputs(transposed_hidden)
    loss = LOSSES[name]
    want = loss(x, w, y, neg, tx, tw)
    want_grads = torch.autograd.grad(want, (x, w))
    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    got = compiled(x, w, y, neg, tx, tw)
    got_grads = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
