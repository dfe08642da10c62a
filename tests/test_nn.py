"""spnn_fast.nn as a library user meets it: a SemanticAttention without a time bias (no parameter
that gets no gradient), its call convention beside nn.MultiheadAttention's, the public names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from _utils import assert_close

import spnn_fast.nn as snn
from spnn_fast.model import SPNN, SPNNConfig
from spnn_fast.nn import SemanticAttention
from spnn_fast.reference.attention import semantic_attention_math

LINEARS = {"qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"}


def _inputs(B=2, L=9, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    mask = torch.arange(L)[None, :] >= torch.tensor([[3], [0]])
    ts = torch.randint(0, 10**6, (B, L), generator=g).sort(dim=1).values
    return x, mask, ts


def _composition(module, x, mask, ts=None, time_bias=None):
    B, L, d = x.shape
    q, k, v = module.qkv(x).view(B, L, 3, module.n_heads, -1).permute(2, 0, 3, 1, 4)
    o = semantic_attention_math(q, k, v, mask, True, ts, time_bias)
    return module.out_proj(o.transpose(1, 2).reshape(B, L, d))


# --- a SemanticAttention without a time bias ---------------------------------------------------


def test_without_time_bias_there_is_no_such_parameter():
    torch.manual_seed(0)
    module = SemanticAttention(24, 3, time_bias=False, backend="torch").double()
    assert module.time_bias is None
    assert {n for n, _ in module.named_parameters()} == LINEARS
    assert set(module.state_dict()) == LINEARS
    assert "time_bias=False" in repr(module) and "num_time_buckets" not in repr(module)
    x, mask, ts = _inputs()
    want = _composition(module, x, mask)
    for got in (module(x, key_mask=mask), module(x, key_mask=mask, timestamps=ts)):
        assert_close(got, want, "out", atol=1e-12, rtol=1e-10, scale_atol=False)
    # Every parameter takes part: autograd.grad over all of them has an answer for each.
    grads = torch.autograd.grad(module(x, key_mask=mask).sum(), list(module.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_with_time_bias_the_state_dict_is_unchanged():
    """The default module keeps its ``time_bias [H, NB]`` under the same key (checkpoints of
    SPNN load as before); a state dict with the bias does not load into a module without."""
    module = SemanticAttention(24, 3, num_time_buckets=8, backend="torch").double()
    assert isinstance(module.time_bias, torch.nn.Parameter)
    assert set(module.state_dict()) == LINEARS | {"time_bias"}
    assert module.state_dict()["time_bias"].shape == (3, 8)
    with torch.no_grad():
        module.time_bias.normal_()
    x, mask, ts = _inputs()
    got = module(x, key_mask=mask, timestamps=ts)
    want = _composition(module, x, mask, ts, module.time_bias)
    assert_close(got, want, "out", atol=1e-12, rtol=1e-10, scale_atol=False)
    copy = SemanticAttention(24, 3, num_time_buckets=8).double()
    copy.load_state_dict(module.state_dict())
    assert torch.equal(copy.time_bias, module.time_bias)
    with pytest.raises(RuntimeError, match="time_bias"):
        SemanticAttention(24, 3, time_bias=False).double().load_state_dict(module.state_dict())
    # The model always has the bias, under the key of its checkpoints.
    model = SPNN(SPNNConfig(num_items=10, max_len=5, d_model=8, n_layers=1, num_time_buckets=6))
    assert model.state_dict()["layers.0.attn.time_bias"].shape == (2, 6)


def test_time_bias_setting_is_checked():
    with pytest.raises(TypeError, match="SemanticAttention: time_bias must be a bool"):
        SemanticAttention(16, 2, time_bias="no")
    with pytest.raises(ValueError, match=r"num_time_buckets must be >= 1 \(time_bias=False"):
        SemanticAttention(16, 2, num_time_buckets=0)
    assert SemanticAttention(16, 2, num_time_buckets=0, time_bias=False).num_time_buckets == 0


_DDP = """
    import sys
    import torch
    import torch.distributed as dist
    from spnn_fast.nn import SemanticAttention

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    net = torch.nn.parallel.DistributedDataParallel(
        SemanticAttention(16, 2, time_bias=sys.argv[2] == "1", backend="torch")
    )
    x = torch.randn(2, 5, 16)
    try:
        for step in range(3):
            net(x).square().sum().backward()
        print("ok")
    except RuntimeError as e:
        print("failed at step", step, str(e).splitlines()[0])
    dist.destroy_process_group()
"""


def test_ddp_trains_a_module_without_timestamps(tmp_path):
    """Under DDP (without find_unused_parameters) a module with the bias table, called without
    timestamps, fails on the second step; one built with ``time_bias=False`` trains."""
    outs = {}
    for flag in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_DDP), str(tmp_path / f"store{flag}"), flag],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[flag] = proc.stdout.strip().splitlines()[-1]
    assert outs["0"] == "ok"
    assert outs["1"].startswith("failed at step 1"), outs["1"]


# --- the call convention and the public names ----------------------------------------------------


def test_multihead_attention_style_call_says_the_module_takes_one_input():
    module = SemanticAttention(16, 2, backend="torch")
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    match = r"takes one input, x \[B, L, 16\] \(self-attention.*key_mask=, timestamps="
    with pytest.raises(TypeError, match=match + r".*got 3 positional inputs"):
        module(x, x, x)
    with pytest.raises(TypeError, match=match + r".*got 2 positional inputs"):
        module(x, mask)  # the mask as a keyword only: never mistaken for the timestamps
    assert module(x, key_mask=mask).shape == (2, 5, 16)


def test_dropout_acts_on_the_output_after_the_projection():
    """Where nn.MultiheadAttention drops attention weights, this module drops elements of its
    output: in training each element is 0 or the eval-mode output scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    module = SemanticAttention(16, 2, dropout=0.5, backend="torch").double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    full = module.eval()(x)
    got = module.train()(x)
    dropped = got == 0
    assert 0 < dropped.float().mean() < 1
    assert torch.allclose(got[~dropped], 2 * full[~dropped])
    doc = " ".join(SemanticAttention.__doc__.split())
    assert "after the output projection" in doc and "drops attention weights" in doc


def test_nn_names_its_public_modules():
    public = {
        name for name, obj in vars(snn).items()
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        and obj.__module__.startswith(snn.__name__ + ".") and not name.startswith("_")
    }  # fmt: skip
    assert sorted(public) == snn.__all__
    namespace = {}
    exec("from spnn_fast.nn import *", namespace)
    assert sorted(n for n in namespace if n != "__builtins__") == snn.__all__


@pytest.mark.parametrize("p", [0.0, 0.1, 0.35, 0.9, 1.0])
def test_fast_dropout_is_dropout(p):
    """Each element kept with probability 1 - p and scaled by 1 / (1 - p), the gradient through
    the same mask; identity in eval mode; the repr and state of nn.Dropout."""
    from spnn_fast.nn import FastDropout

    torch.manual_seed(0)
    d = FastDropout(p)
    assert repr(d) == repr(torch.nn.Dropout(p)).replace("Dropout", "FastDropout")
    assert d.state_dict() == {}
    x = torch.rand(200, 500) + 0.5  # no zeros: a zero output means dropped
    x.requires_grad_(True)
    y = d(x)
    kept = y != 0
    n = kept.numel()
    rate = float(kept.sum()) / n
    sd = ((1 - p) * p / n) ** 0.5
    assert abs(rate - (1 - p)) <= 6 * sd + 1e-12, (rate, p)
    if p < 1:
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    want = kept.float() / (1 - p) if p < 1 else torch.zeros_like(x)
    torch.testing.assert_close(x.grad, want)
    d.eval()
    assert torch.equal(d(x), x)


def test_a_multi_code_item_feature_is_the_mean_of_its_codes():
    """An item's several codes of one feature (genres) enter as the mean of their embeddings,
    code 0 (none) left out, zeros for an item with none; the gradient reaches the codes used."""
    import numpy as np

    from spnn_fast.model import SPNN, SPNNConfig

    codes = np.array([[0, 0, 0], [1, 2, 0], [3, 3, 4], [0, 0, 0], [5, 0, 0]])  # items 0..4
    cfg = SPNNConfig(num_items=4, max_len=4, d_model=8, n_layers=1, num_time_buckets=6,
                     item_feature_vocab={"genre": 6})  # fmt: skip
    model = SPNN(cfg, item_features={"genre": codes})
    torch.nn.init.normal_(model.item_feat_emb["genre"].weight)
    with torch.no_grad():
        model.item_feat_emb["genre"].weight[0].zero_()
    items = torch.tensor([[0, 1, 2, 3], [4, 2, 1, 0]])
    feats = model._features(items, torch.zeros_like(items), None)
    genre = feats[3]
    w = model.item_feat_emb["genre"].weight
    want = torch.stack([torch.stack([
        w[[c for c in codes[i] if c]].mean(0) if any(codes[i]) else torch.zeros(8)
        for i in row.tolist()]) for row in items])  # fmt: skip
    torch.testing.assert_close(genre, want)
    genre.sum().backward()
    assert w.grad[0].abs().sum() == 0 and (w.grad[1:].abs().sum(1) > 0).all()


@pytest.mark.parametrize("nf", [3, 7, 8, 9])
@pytest.mark.parametrize("gate_grad", [False, True])
def test_gated_sum_is_the_plain_formula(nf, gate_grad):
    """SPNN.embed's fusion: the eager CPU function (one write of each feature's gradient, the
    gate padded to 8 outputs) against the plain ops, outputs and every gradient."""
    from spnn_fast.nn import _gated

    g = torch.Generator().manual_seed(nf)
    stacked = torch.randn(5, 4, nf, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(nf, nf * 6, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(nf, generator=g, dtype=torch.float64)
    dx = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    dg = torch.randn(5, 4, nf, generator=g, dtype=torch.float64)
    results = []
    for fn in (_gated._GatedSum.apply, _gated._plain):
        leaves = [t.clone().requires_grad_() for t in (stacked, weight, bias)]
        x, gate = fn(*leaves)
        loss = (x * dx).sum() + ((gate * dg).sum() if gate_grad else 0)
        results.append((x, gate, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda s, w, b: _gated._GatedSum.apply(s, w, b),
        (stacked[:2, :2].clone().requires_grad_(), weight.clone().requires_grad_(),
         bias.clone().requires_grad_()),
    )  # fmt: skip
