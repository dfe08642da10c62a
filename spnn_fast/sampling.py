"""Negative sampling for the sampled softmax losses: which classes a step scores besides the
targets, and the log-probabilities that correct for it.

The classes are the rows of the item table the loss is given (a model's whole ``item_emb.weight``,
row ``padding_idx`` = padding). :class:`NegativeSampler` draws ``k`` class ids with replacement,
shared by every row of a batch, either uniformly over the classes other than padding or
proportionally to ``counts ** power`` (popularity; word2vec takes ``power=0.75``), and gives
``log_q``, the log of each class's probability, which
:func:`spnn_fast.functional.sampled_softmax_loss` subtracts from the logits so that the sampled
loss estimates the full softmax's gradient without the popularity bias.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch import Tensor

from spnn_fast._checks import check_int, check_real, describe

__all__ = ["NegativeSampler"]


class NegativeSampler:
    """Draws negatives ``[k]`` (int64 class ids in ``[0, num_classes)``) with replacement.

    Args:
        num_classes: rows of the item table, padding included (``V + 1`` for items 1..V).
        counts: None for uniform sampling over the classes other than ``padding_idx``; else
            ``[num_classes]`` non-negative finite counts (a tensor or anything
            ``torch.as_tensor`` takes), and class ``c`` is drawn with probability
            ``counts[c] ** power / sum``. Classes with a zero count, and ``padding_idx``
            whatever its count, are never drawn.
        power: the exponent of the counts, ``>= 0`` (0: uniform over the classes seen at least
            once). Ignored without counts.
        padding_idx: the class never drawn (row 0 by the package's convention), or None.

    Attributes:
        log_q: float32 ``[num_classes]`` on the CPU, ``log`` of each class's probability of one
            draw; ``-inf`` at ``padding_idx`` and at classes with a zero count. Pass it (moved to
            the loss's device) as the loss's ``log_q``.
        probs: float64 ``[num_classes]``, the probabilities themselves.

    :meth:`sample` costs ``O(k log C)`` (a binary search of a precomputed CDF per draw) or
    ``O(k)`` (uniform), and is reproducible with a seeded ``generator``.
    """

    def __init__(
        self,
        num_classes: int,
        counts: Optional[object] = None,
        *,
        power: float = 1.0,
        padding_idx: Optional[int] = 0,
    ) -> None:
        num_classes = check_int("num_classes", num_classes, 1)
        if padding_idx is not None:
            padding_idx = check_int("padding_idx", padding_idx, 0)
            if padding_idx >= num_classes:
                raise ValueError(
                    f"padding_idx must be in [0, num_classes={num_classes}) or None, got "
                    f"{padding_idx}"
                )
        power = check_real("power", power, 0.0)
        self.num_classes, self.padding_idx, self.power = num_classes, padding_idx, power
        self.uniform = counts is None
        if counts is None:
            weights = torch.ones(num_classes, dtype=torch.float64)
        else:
            weights = self._weights(counts, num_classes, power)
        if padding_idx is not None:
            weights[padding_idx] = 0.0
        total = weights.sum()
        if not total > 0:
            what = "every class is padding" if counts is None else "every count is 0"
            raise ValueError(
                f"NegativeSampler has no class to draw: {what} (padding_idx={padding_idx} is "
                f"never drawn)"
            )
        self.probs = weights / total
        self.log_q = self.probs.log().to(torch.float32)
        self._cdf = torch.cumsum(self.probs, 0)
        # The last class with a positive probability: a uniform draw that rounds up to the
        # CDF's total lands there, never on a zero-probability class past it.
        self._last = int(torch.nonzero(weights > 0)[-1, 0])
        self._cdfs: Dict[torch.device, Tensor] = {torch.device("cpu"): self._cdf}

    @staticmethod
    def _weights(counts: object, num_classes: int, power: float) -> Tensor:
        try:
            c = torch.as_tensor(counts)
            if not isinstance(counts, Tensor) and c.is_floating_point():
                # Python floats are float64: torch's default float32 would round small counts
                # to 0 (a class never drawn), large ones to inf, and lose digits between
                c = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"counts must be a tensor or an array of numbers: {e}") from None
        if c.dtype == torch.bool or c.is_complex() or c.shape != (num_classes,):
            raise ValueError(
                f"counts must be a real [num_classes={num_classes}] tensor, got {describe(c)}"
            )
        c = c.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(c) | (c < 0)
        if bad.any():
            first = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"counts must be finite and >= 0; counts[{first}] = {c[first].item()} "
                f"({int(bad.sum())} such classes)"
            )
        positive = c > 0
        # Scaled by the largest count first: counts ** power overflows float64 long before the
        # ratios do.
        scaled = (c / c.max().clamp_min(1e-300)).clamp_min(1e-300)
        return torch.where(positive, scaled**power, torch.zeros_like(c))

    def _cdf_on(self, device: torch.device) -> Tensor:
        if device not in self._cdfs:
            self._cdfs[device] = self._cdf.to(device)
        return self._cdfs[device]

    def sample(
        self,
        k: int,
        generator: Optional[torch.Generator] = None,
        device: Union[torch.device, str, None] = None,
    ) -> Tensor:
        """``k >= 1`` class ids, int64 ``[k]``, drawn with replacement.

        The draw runs on the generator's device when one is given (the result then moves to
        ``device``), else on ``device`` (default the CPU), so a CUDA generator draws on the GPU
        without a host round trip. Equal seeds give equal draws on one device.
        """
        k = check_int("k", k, 1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        out_device = torch.device(device) if device is not None else None
        where = generator.device if generator is not None else (out_device or torch.device("cpu"))
        if self.uniform:
            span = self.num_classes - (self.padding_idx is not None)
            ids = torch.randint(0, span, (k,), generator=generator, device=where)
            if self.padding_idx is not None:  # skip the padding row
                ids += (ids >= self.padding_idx).to(ids.dtype)
        else:
            cdf = self._cdf_on(where)
            u = torch.rand(k, generator=generator, dtype=torch.float64, device=where) * cdf[-1]
            ids = torch.searchsorted(cdf, u, right=True).clamp_(max=self._last)
        return ids if out_device is None else ids.to(out_device)

    def __repr__(self) -> str:
        how = "uniform" if self.uniform else f"counts ** {self.power}"
        return (
            f"NegativeSampler(num_classes={self.num_classes}, {how}, "
            f"padding_idx={self.padding_idx})"
        )
