"""Losses that train for a certified margin.

A network with Lipschitz bound ``L`` (in L2) is certified at radius ``eps`` on ``x`` when
its logit margin ``f_y(x) - max_{j != y} f_j(x)`` exceeds ``sqrt(2) * L * eps``. Plain
cross-entropy stops pushing once the prediction is confident; these losses instead ask for
that margin explicitly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def margin_for(eps: float, lipschitz: float) -> float:
    """The logit margin ``sqrt(2) * lipschitz * eps`` that certifies radius ``eps``."""
    return math.sqrt(2) * lipschitz * eps


def offset_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, offset: float,
                         temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of ``(logits - offset * onehot(targets)) / temperature``, times ``temperature``.

    Lowering the true logit by ``offset`` before the softmax makes the loss small only when
    the margin exceeds ``offset``. The temperature sets how sharply it saturates; the final
    factor keeps the gradient scale independent of it.

    Reference:
        Prach, Lampert. "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
        Networks", ECCV 2022 (Eq. 7); Prach et al., "1-Lipschitz Layers Compared", CVPR 2024.

    Example:
        >>> z, y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
        >>> bool(offset_cross_entropy(z, y, offset=4.0) > offset_cross_entropy(z, y, offset=0.0))
        True
    """
    shifted = logits - offset * F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return F.cross_entropy(shifted / temperature, targets) * temperature


def multi_margin_hinge(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean_j relu(margin - (f_y - f_j))`` over the wrong classes ``j``, averaged over the batch.

    Zero exactly when every margin exceeds ``margin``, i.e. when the batch is certified at
    the radius that ``margin`` stands for.

    Example:
        >>> z = torch.tensor([[2.0, 0.5, 0.0]])
        >>> float(multi_margin_hinge(z, torch.tensor([0]), margin=1.0))
        0.0
    """
    true = logits.gather(1, targets[:, None])
    gaps = F.relu(margin - (true - logits))
    wrong = 1 - F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return (gaps * wrong).sum(1).div(logits.shape[-1] - 1).mean()


class CertifiedMarginLoss(nn.Module):
    """The training loss of a recipe: ``"ce"`` (:func:`offset_cross_entropy`) or ``"hinge"``.

    Args:
        kind: ``"ce"`` or ``"hinge"``.
        eps: the L2 radius (in input units) trained for.
        lipschitz: the Lipschitz bound of the model (e.g. ``1 / min(std)`` of its input
            normalization); only used to turn ``eps`` into a logit margin.
        offset: the logit margin itself, overriding ``sqrt(2) * lipschitz * eps``.
        temperature: of the cross-entropy (ignored by the hinge).
    """

    def __init__(self, kind: str = "ce", eps: float = 0.5, lipschitz: float = 1.0, offset: float | None = None,
                 temperature: float = 1.0):
        super().__init__()
        if kind not in ("ce", "hinge"):
            raise ValueError(f"loss kind must be 'ce' or 'hinge', got {kind!r}")
        self.kind = kind
        self.offset = margin_for(eps, lipschitz) if offset is None else float(offset)
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.kind == "ce":
            return offset_cross_entropy(logits, targets, self.offset, self.temperature)
        return multi_margin_hinge(logits, targets, self.offset)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, offset={self.offset:.4g}, temperature={self.temperature}"
