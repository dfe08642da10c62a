"""SPNN: the semantic perception neural network for next-item recommendation.

Each event of a user's history is encoded from

* its item embedding (tied with the output layer),
* a position embedding (windows are left-padded, so the newest event always sits in the last
  column and positions count back from it),
* a time-gap-bucket embedding (``bucket(g) = min(NB - 1, bit_length(g))`` of the gap to the
  user's previous event: the encoder's ``time_buckets``),
* side features where the data has them: item features (e.g. genres, several codes per item,
  averaged) and user features (e.g. age, gender, occupation, broadcast over the sequence),

fused by a learned per-feature gate: a softmax over the features, computed per event from all of
them, weighs how much each one matters (plain fusion would add them with equal weight). Then
``n_layers`` semantic perception layers (:class:`spnn_fast.nn.SemanticAttention` with its learned
time-interval bias, a feed-forward block, pre-norm residuals) and a final layer norm give the
hidden state of every position; its dot product with the item embeddings scores the next item.

A teacher model can carry a :class:`spnn_fast.nn.KnowledgeDetector` over one of its layers, trained
with it (an auxiliary next-item loss on the detector's attention-pooled vector) and used frozen by
:class:`spnn_fast.nn.FeatureDistiller` when a student is distilled from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spnn_fast import backends
from spnn_fast._checks import is_int, is_real, plain_number
from spnn_fast.limits import MAX_TIME_BUCKETS
from spnn_fast.nn import FastDropout, KnowledgeDetector, SemanticAttention
from spnn_fast.nn._gated import gated_sum

__all__ = ["MODEL_BACKENDS", "SPNN", "SPNNConfig", "SPNNOutput", "Recommendations", "window_items"]

# The backends of the model's ops (attention and losses): they have no C++ implementation.
MODEL_BACKENDS = tuple(b for b in backends.BACKENDS if b != "cpp")


@dataclass
class SPNNConfig:
    """Shape and regularization of an SPNN model.

    ``item_feature_vocab`` / ``user_feature_vocab`` map each side feature to its number of codes
    (code 0 = unknown / padding); the code tables themselves are given to :class:`SPNN`.
    ``detector_layers`` (teachers) names the layers that carry a knowledge detector. The
    defaults are the main job's teacher (:class:`spnn_fast.config.ExperimentConfig`).
    """

    num_items: int
    max_len: int = 30
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    d_ff: Optional[int] = None
    dropout: float = 0.35
    num_time_buckets: int = 32
    item_feature_vocab: Dict[str, int] = field(default_factory=dict)
    user_feature_vocab: Dict[str, int] = field(default_factory=dict)
    detector_layers: List[str] = field(default_factory=list)
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy numbers would make an unreadable checkpoint
            setattr(self, f.name, plain_number(getattr(self, f.name)))
        vocabs = {}
        for name in ("item_feature_vocab", "user_feature_vocab"):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, {k: plain_number(n) for k, n in v.items()})
            vocabs[name] = isinstance(v, dict) and all(
                isinstance(k, str) and is_int(n, 1) for k, n in getattr(self, name).items()
            )
        heads_ok = is_int(self.n_heads, 1)
        checks = {  # name: (holds, the rule)
            "num_items": (is_int(self.num_items, 1), "an integer >= 1"),
            "max_len": (is_int(self.max_len, 1), "an integer >= 1"),
            "n_heads": (heads_ok, "an integer >= 1"),
            "d_model": (
                is_int(self.d_model, 1) and (not heads_ok or self.d_model % self.n_heads == 0),
                f"an integer >= 1 and a multiple of n_heads={self.n_heads!r} (each head "
                f"takes d_model / n_heads dims)",
            ),
            "n_layers": (is_int(self.n_layers, 1), "an integer >= 1"),
            "d_ff": (
                self.d_ff is None or is_int(self.d_ff, 1),
                "None (4 * d_model) or an integer >= 1",
            ),  # fmt: skip
            "dropout": (is_real(self.dropout, 0.0) and self.dropout < 1.0, "a number in [0, 1)"),
            "num_time_buckets": (
                is_int(self.num_time_buckets, 1) and self.num_time_buckets <= MAX_TIME_BUCKETS,
                f"an integer in [1, {MAX_TIME_BUCKETS}] (the kernels' time-bias table)",
            ),
            **{
                n: (ok, "a dict of feature name -> number of codes >= 1 (code 0: none)")
                for n, ok in vocabs.items()
            },
            "detector_layers": (
                isinstance(self.detector_layers, (list, tuple))
                and all(isinstance(x, str) for x in self.detector_layers),
                "a list of layer names",
            ),
            "backend": (
                self.backend is None
                or (isinstance(self.backend, str) and self.backend.lower() in MODEL_BACKENDS),
                f"None or one of {', '.join(MODEL_BACKENDS)}",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"SPNNConfig.{name}={getattr(self, name)!r} must be {rule}")
        self.detector_layers = list(self.detector_layers)
        for layer in self.detector_layers:
            if layer not in self.layer_names():
                raise ValueError(f"detector layer {layer!r} is not one of {self.layer_names()}")

    def layer_names(self) -> List[str]:
        """Names of the layers whose outputs :meth:`SPNN.forward` can return."""
        return ["embed"] + [f"layers.{i}" for i in range(self.n_layers)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SPNNConfig:
        return cls(**d)


@dataclass
class SPNNOutput:
    hidden: Tensor  # [B, L, d_model], zero at padding
    layers: Dict[str, Tensor]  # name -> [B, L, d] intermediate features (when asked for)


class Recommendations(NamedTuple):
    """``items [B, k]`` int64 item ids (0 in slots no item fills) and their ``scores [B, k]`` in
    the model's dtype (``-inf`` there), best first, equal scores by the lower id."""

    items: Tensor
    scores: Tensor


def window_items(batch) -> Tuple[Tensor, Tensor]:
    """The items of each window of ``batch`` as a CSR pair ``(offsets [B + 1], item_ids)``,
    read where its mask is True (no ``[B, V]`` mask is formed)."""
    mask = batch.mask
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask.sum(dim=1), dim=0, out=offsets[1:])
    return offsets, batch.items[mask]


class _FeedForward(nn.Module):
    # Dropout sits on the block's output (the residual branch), not on the wide inner activation:
    # on the CPU the dropout mask of the 4x-wide tensor costs as much as the block's matmuls.
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SemanticPerceptionLayer(nn.Module):
    """Pre-norm residual block: semantic attention with time bias, then a feed-forward block."""

    def __init__(self, cfg: SPNNConfig) -> None:
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SemanticAttention(
            cfg.d_model,
            cfg.n_heads,
            num_time_buckets=cfg.num_time_buckets,
            causal=True,
            dropout=cfg.dropout,
            backend=cfg.backend,
        )
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = _FeedForward(cfg.d_model, d_ff)
        self.drop = FastDropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, timestamps: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask=mask, timestamps=timestamps)
        x = x + self.drop(self.ff(self.norm2(x)))
        return x * mask.unsqueeze(-1)


class SPNN(nn.Module):
    """SPNN over left-padded windows ``[B, L]`` (L <= ``config.max_len``).

    Args:
        config: the model's shape.
        item_features: feature name -> int64 codes ``[V + 1]`` or ``[V + 1, G]`` indexed by item id
            (row 0 = padding; code 0 = none), for the names in ``config.item_feature_vocab``.
        user_features: feature name -> int64 codes ``[U]`` indexed by user row.
    """

    def __init__(
        self,
        config: SPNNConfig,
        item_features: Optional[Dict[str, np.ndarray]] = None,
        user_features: Optional[Dict[str, np.ndarray]] = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.time_emb = nn.Embedding(cfg.num_time_buckets, d)
        self.item_feat_emb = nn.ModuleDict()
        self.user_feat_emb = nn.ModuleDict()
        for name, vocab in cfg.item_feature_vocab.items():
            codes = _codes_table("item_features", name, item_features, cfg.num_items + 1, vocab)
            self.register_buffer(f"item_codes_{name}", codes, persistent=True)
            self.item_feat_emb[name] = nn.Embedding(vocab, d, padding_idx=0)
        for name, vocab in cfg.user_feature_vocab.items():
            codes = _codes_table("user_features", name, user_features, None, vocab)
            self.register_buffer(f"user_codes_{name}", codes, persistent=True)
            self.user_feat_emb[name] = nn.Embedding(vocab, d, padding_idx=0)
        n_feats = 3 + len(self.item_feat_emb) + len(self.user_feat_emb)
        self.feature_names = (
            ["item", "position", "time_gap"]
            + [f"item:{n}" for n in self.item_feat_emb]
            + [f"user:{n}" for n in self.user_feat_emb]
        )
        self.gate = nn.Linear(n_feats * d, n_feats)
        self.embed_norm = nn.LayerNorm(d)
        self.embed_drop = FastDropout(cfg.dropout)
        self.layers = nn.ModuleList(SemanticPerceptionLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d)
        # Knowledge detectors (teachers): attention-pooling heads over the named layers.
        self.detectors = nn.ModuleDict(
            {name.replace(".", "_"): KnowledgeDetector(d) for name in cfg.detector_layers}
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        side = [*self.item_feat_emb.values(), *self.user_feat_emb.values()]
        for emb in [self.item_emb, self.pos_emb, self.time_emb, *side]:
            nn.init.normal_(emb.weight, std=0.02)
        for emb in [self.item_emb, *side]:  # code 0 is padding / unknown
            with torch.no_grad():
                emb.weight[0].zero_()
        nn.init.zeros_(self.gate.weight)  # start from an even blend of the features
        nn.init.zeros_(self.gate.bias)

    @classmethod
    def from_state(cls, config: SPNNConfig, state_dict: Dict[str, Tensor]) -> SPNN:
        """Rebuild a saved model: its feature code tables travel in the state dict."""
        item = {n: state_dict[f"item_codes_{n}"].cpu().numpy() for n in config.item_feature_vocab}
        user = {n: state_dict[f"user_codes_{n}"].cpu().numpy() for n in config.user_feature_vocab}
        model = cls(config, item, user)
        model.load_state_dict(state_dict)
        return model

    # ---------------------------------------------------------------- embedding + gate
    def _features(
        self, items: Tensor, time_buckets: Tensor, users: Optional[Tensor]
    ) -> List[Tensor]:
        B, L = items.shape
        offset = self.config.max_len - L  # left padding: the last column is the newest event
        pos = torch.arange(offset, offset + L, device=items.device)
        feats = [
            self.item_emb(items),
            self.pos_emb(pos).unsqueeze(0).expand(B, L, -1),
            self.time_emb(time_buckets),
        ]
        for name, emb in self.item_feat_emb.items():
            codes = getattr(self, f"item_codes_{name}")[items]  # [B, L] or [B, L, G]
            if codes.dim() == 2:
                feats.append(emb(codes))
            else:  # the mean over the item's codes but code 0 (none); 0 when it has none
                mean = F.embedding_bag(codes.flatten(0, 1), emb.weight, mode="mean", padding_idx=0)
                feats.append(mean.view(B, L, -1))
        for name, emb in self.user_feat_emb.items():
            table = getattr(self, f"user_codes_{name}")
            if users is None:  # no user is known: every row takes the unknown code 0
                codes = table.new_zeros(B)
            else:  # user -1 is one the model has not seen: the unknown code too
                codes = table[users.clamp(min=0)] * (users >= 0)
            feats.append(emb(codes).unsqueeze(1).expand(B, L, -1))
        return feats

    def embed(
        self,
        items: Tensor,
        time_buckets: Tensor,
        mask: Tensor,
        users: Optional[Tensor] = None,
        return_gate: bool = False,
    ):
        """Gated fusion of the event features: ``[B, L, d]`` (and the gate ``[B, L, F]``)."""
        feats = self._features(items, time_buckets, users)
        # gate = softmax(self.gate(stacked.flatten(-2))) [B, L, F]; x = sum_f gate_f * feature_f
        x, gate = gated_sum(torch.stack(feats, dim=-2), self.gate.weight, self.gate.bias)
        x = self.embed_drop(self.embed_norm(x * len(feats))) * mask.unsqueeze(-1)
        return (x, gate) if return_gate else x

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        items: Tensor,
        timestamps: Tensor,
        time_buckets: Tensor,
        mask: Tensor,
        users: Optional[Tensor] = None,
        return_layers: Tuple[str, ...] = (),
    ) -> SPNNOutput:
        """Hidden states of every position.

        Args:
            items, timestamps, time_buckets: int64 ``[B, L]`` (a :class:`SequenceBatch`'s fields).
            mask: bool ``[B, L]``, True at events.
            users: int64 ``[B]`` user rows of the training data's users, ``-1`` for a user the
                model has not seen (a cold-start user), or None when no user is known; an unseen
                user's features take the "unknown" code 0, so the model scores it from its
                events alone.
            return_layers: names from ``config.layer_names()`` whose outputs to return.
        """
        if items.dim() != 2 or items.shape[1] > self.config.max_len:
            raise ValueError(
                f"items must be [B, L] with L <= max_len={self.config.max_len}, "
                f"got {tuple(items.shape)}"
            )
        unknown = set(return_layers) - set(self.config.layer_names())
        if unknown:
            raise ValueError(
                f"unknown layers {sorted(unknown)}; valid: {self.config.layer_names()}"
            )
        layers: Dict[str, Tensor] = {}
        x = self.embed(items, time_buckets, mask, users)
        if "embed" in return_layers:
            layers["embed"] = x
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, timestamps)
            if f"layers.{i}" in return_layers:
                layers[f"layers.{i}"] = x
        hidden = self.final_norm(x) * mask.unsqueeze(-1)
        return SPNNOutput(hidden=hidden, layers=layers)

    def detector(self, layer: str) -> Optional[KnowledgeDetector]:
        """The knowledge detector over ``layer`` (None when the model has none there)."""
        key = layer.replace(".", "_")  # ModuleDict keys cannot hold "."
        return self.detectors[key] if key in self.detectors else None

    def item_table(self) -> Tensor:
        """Item embeddings ``[V, d]`` of items 1..V (the padding row is never scored)."""
        return self.item_emb.weight[1:]

    def score(self, hidden: Tensor) -> Tensor:
        """Scores of all ids 0..V, ``[..., V + 1]``; column 0 (padding) is -inf."""
        scores = hidden @ self.item_emb.weight.T
        scores[..., 0] = float("-inf")
        return scores

    @torch.no_grad()
    def recommend(
        self,
        batch,
        k: int,
        *,
        exclude_seen: bool = True,
        seen: Optional[Tuple[Tensor, Tensor]] = None,
        backend: Optional[str] = None,
    ) -> Recommendations:
        """The ``k`` best next items for the newest (last) position of each window of ``batch``,
        by :func:`spnn_fast.functional.topk_scores` (no ``[B, V]`` score matrix).

        Args:
            batch: a :class:`~spnn_fast.encode.SequenceBatch` of left-padded windows
                (``users`` may be None: unknown users' features take the unknown code); moved to
                the model's device.
            k: items per window, in ``[1, V]``.
            exclude_seen: leave out the seen items: the window's own items, or ``seen``.
            seen: ``(offsets [B + 1], item_ids)``, a CSR list of each window's seen items used
                instead of the window's (e.g. a user's whole history).
            backend: of the top-k op (None: the model's ``config.backend``).

        Returns:
            :class:`Recommendations` ``(items, scores)``, ``[B, k]`` each; where fewer than
            ``k`` unseen items exist, the last slots hold item 0 and score ``-inf``. The model
            runs in eval mode and its mode is restored.
        """
        from spnn_fast.functional import topk_scores

        self._check_batch_ids(batch)
        device = self.item_emb.weight.device
        was_training = self.training
        self.eval()
        try:
            users = batch.users.to(device) if batch.users is not None else None
            out = self(batch.items.to(device), batch.timestamps.to(device),
                       batch.time_buckets.to(device), batch.mask.to(device), users)  # fmt: skip
        finally:
            self.train(was_training)
        exclude = None
        if exclude_seen:
            exclude = tuple(t.to(device) for t in (window_items(batch) if seen is None else seen))
        backend = self.config.backend if backend is None else backend
        scores, items = topk_scores(out.hidden[:, -1], self.item_emb.weight, k, exclude=exclude,
                                    padding_idx=0, backend=backend)  # fmt: skip
        return Recommendations(items, scores)

    def _check_batch_ids(self, batch) -> None:
        """ValueError naming the field of ``batch`` that holds an id beyond the model's tables
        (indexing them would raise a bare IndexError): items, time buckets, user rows."""
        cfg, tables = self.config, [getattr(self, f"user_codes_{n}") for n in self.user_feat_emb]
        fields = {
            "items": (0, cfg.num_items, "[0, V] (items 1..V, 0 = padding)"),
            "time_buckets": (0, cfg.num_time_buckets - 1, "[0, num_time_buckets - 1]"),
        }
        if tables and batch.users is not None:
            fields["users"] = (-1, min(map(len, tables)) - 1, "[-1, U - 1] (-1 = unseen)")
        for name, (lo, hi, rule) in fields.items():
            t = getattr(batch, name)
            bad = ((t < lo) | (t > hi)).nonzero()
            if len(bad):
                at = tuple(bad[0].tolist())
                raise ValueError(f"batch.{name} holds {int(t[at])} (row {at[0]}), outside the "
                                 f"model's {rule} = [{lo}, {hi}]")  # fmt: skip

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"features={self.feature_names}"


def _codes_table(
    arg: str, name: str, tables: Optional[Dict[str, np.ndarray]], rows: Optional[int], vocab: int
) -> Tensor:
    if tables is None or name not in tables:
        raise ValueError(f"{arg} has no table for the configured feature {name!r}")
    # A copy: the model never shares memory with (so never changes) the caller's tables. Checked
    # on the CPU, then placed where tensors are made by default (the meta device included, where
    # a model's parameters are counted without memory).
    codes = torch.tensor(np.asarray(tables[name]), dtype=torch.int64, device="cpu")
    if rows is not None and codes.shape[0] != rows:
        raise ValueError(f"{arg}[{name!r}] has {codes.shape[0]} rows, expected {rows}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"{arg}[{name!r}] has codes outside [0, {vocab})")
    return codes.to(torch.empty(0).device).contiguous()
