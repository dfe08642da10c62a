"""The losses as modules: DistillationLoss, LinearCrossEntropyLoss, SampledSoftmaxLoss,
SampledDistillationLoss (each ``forward`` one call into :mod:`spnn_fast.functional`)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from spnn_fast.nn.attention import check_sizes

__all__ = [
    "DistillationLoss",
    "LinearCrossEntropyLoss",
    "SampledDistillationLoss",
    "SampledSoftmaxLoss",
]


class DistillationLoss(nn.Module):
    """Fused linear cross-entropy + logit distillation; see
    :func:`spnn_fast.functional.distillation_loss` for the arguments of ``forward``.

    ``alpha = 0`` is the plain fused linear cross-entropy (no teacher needed). Lists of teacher
    tensors are an ensemble, combined as ``ensemble`` says.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: Optional[float] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: Optional[str] = None,
        ensemble: str = "distributions",
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.ensemble = ensemble

    def forward(
        self,
        student_hidden: Tensor,
        student_items: Tensor,
        teacher_hidden: Union[Tensor, Sequence[Tensor], None] = None,
        teacher_items: Union[Tensor, Sequence[Tensor], None] = None,
        target: Optional[Tensor] = None,
    ) -> Tensor:
        """The loss of :func:`spnn_fast.functional.distillation_loss`: hidden states
        ``[..., Ds]`` / ``[..., Dt]`` (or a list of M teachers' ``[..., Dt_m]``), item tables
        ``[V, Ds]`` / ``[V, Dt]`` (or the M teachers' ``[V, Dt_m]``), integer ``target`` of the
        leading shape (``ignore_index`` where a row does not count); float32, a scalar or the
        leading shape with ``reduction="none"``."""
        from spnn_fast.functional import distillation_loss

        return distillation_loss(
            student_hidden, student_items, teacher_hidden, teacher_items, target,
            temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
            reduction=self.reduction, ensemble=self.ensemble, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"ensemble={self.ensemble!r}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """PyTorch's :class:`torch.nn.LinearCrossEntropyLoss` on the fused kernels: a ``Linear(in_features,
    num_classes)`` whose logits feed ``cross_entropy``, never formed whole.

    ``forward(input [..., in_features], target [...] class indices) -> loss`` is one call to
    :func:`spnn_fast.functional.linear_cross_entropy`; the arguments, the parameter names
    (``linear.weight``, ``linear.bias``, the ``weight`` buffer) and so the state dicts are
    PyTorch's. ``out_features`` (a K-dimensional loss) must be ``()``; ``options`` is accepted
    and not needed. ``backend`` picks the implementation (see :mod:`spnn_fast.backends`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options: object = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_sizes("LinearCrossEntropyLoss", in_features=in_features, num_classes=num_classes)
        if tuple(out_features) != ():
            raise NotImplementedError("LinearCrossEntropyLoss: out_features must be ()")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        self.num_classes, self.out_features = num_classes, ()
        self.reduction, self.ignore_index = reduction, ignore_index
        self.label_smoothing, self.options, self.backend = label_smoothing, options, backend
        self.register_buffer("weight", weight)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``linear(input)`` against ``target``: ``input [..., in_features]``
        floating, ``target [...]`` integer class indices in ``[0, num_classes)`` or
        ``ignore_index``; a scalar, or the leading shape with ``reduction="none"``."""
        from spnn_fast.functional import linear_cross_entropy

        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


class SampledSoftmaxLoss(nn.Module):
    """Cross-entropy over each row's target and ``K`` shared negatives, logQ corrected:
    ``forward(input [..., D], weight [C, D], target [...], negatives [K], log_q [C] = None)`` is
    :func:`spnn_fast.functional.sampled_softmax_loss`. The negatives and ``log_q`` typically come
    from a :class:`spnn_fast.sampling.NegativeSampler` (``sample(K)``, ``log_q``)."""

    def __init__(self, remove_accidental_hits: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None) -> None:  # fmt: skip
        super().__init__()
        self.remove_accidental_hits, self.ignore_index = remove_accidental_hits, ignore_index
        self.reduction, self.backend = reduction, backend

    def _options(self) -> dict:
        return dict(remove_accidental_hits=self.remove_accidental_hits,
                    ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)  # fmt: skip

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, negatives: Tensor,
                log_q: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        from spnn_fast.functional import sampled_softmax_loss

        return sampled_softmax_loss(
            input, weight, target, negatives, log_q=log_q, **self._options()
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items() if k != "backend")


class SampledDistillationLoss(SampledSoftmaxLoss):
    """:class:`DistillationLoss` over sampled candidates (each row's target and the shared
    negatives): ``forward(student_hidden, student_items, teacher_hidden=None, teacher_items=None,
    target=None, negatives=None, log_q=None)`` is
    :func:`spnn_fast.functional.sampled_distillation_loss` (``alpha = 0``: no teacher needed)."""

    def __init__(self, temperature: float = 2.0, alpha: Optional[float] = None,
                 remove_accidental_hits: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None) -> None:  # fmt: skip
        super().__init__(remove_accidental_hits, ignore_index, reduction, backend)
        self.temperature, self.alpha = temperature, alpha

    def _options(self) -> dict:
        return dict(temperature=self.temperature, alpha=self.alpha, **super()._options())

    def forward(self, student_hidden: Tensor, student_items: Tensor,
                teacher_hidden: Optional[Tensor] = None, teacher_items: Optional[Tensor] = None,
                target: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                log_q: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        from spnn_fast.functional import sampled_distillation_loss

        return sampled_distillation_loss(student_hidden, student_items, teacher_hidden,
                                         teacher_items, target, negatives, log_q=log_q,
                                         **self._options())  # fmt: skip
