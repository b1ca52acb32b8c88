"""Losses that train for a certified margin.

A network with Lipschitz bound ``L`` (in L2) is certified at radius ``eps`` on ``x`` when
its logit margin ``f_y(x) - max_{j != y} f_j(x)`` exceeds ``sqrt(2) * L * eps``. Plain
cross-entropy stops pushing once the prediction is confident; these losses instead ask for
that margin explicitly.

When the last layer is linear, ``f = W h + b`` with an ``L_h``-Lipschitz body, the
certificate is per class pair (:mod:`lipnet.certify.radius`): ``f_y - f_j`` is
``K_yj = L_h ||w_y - w_j||``-Lipschitz, at most ``sqrt(2) L``. :func:`pairwise_margin_cross_entropy`
asks each pair for the margin that certificate needs instead of the generic one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def margin_for(eps: float, lipschitz: float) -> float:
    """The logit margin ``sqrt(2) * lipschitz * eps`` that certifies radius ``eps``."""
    return math.sqrt(2) * lipschitz * eps


def _one_hot(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``onehot(targets)`` in the dtype and shape of ``logits``; unlike ``F.one_hot`` it reads no
    value on the host, so it runs under ``torch.func.vmap`` (per-example gradients). Targets out
    of range are left to the cross-entropy or ``gather`` that every loss here also applies."""
    classes = torch.arange(logits.shape[-1], device=logits.device)
    return (classes == targets[..., None]).to(logits.dtype)


def _checked(name: str, value: float, *, positive: bool = False, what: str = "") -> float:
    """``value`` as a float, refused unless finite and ``> 0`` (``positive``) or ``>= 0``."""
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite{what}, got {value}")
    return value


def _checked_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32 at least (float64 stays), after checking they are ``(N, K)`` with
    ``K >= 2`` and ``targets`` ``(N,)``: an offset or a ``logits / temperature`` in bfloat16 or
    float16 would be rounded to 8 or 11 bits, or overflow."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, K) with K >= 2 classes (a margin needs a wrong class), "
                         f"got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(logits.shape[:1])} class indices, got shape "
                         f"{tuple(targets.shape)}")
    return _at_least_float32(logits)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if its dtype is narrower (bfloat16, float16); float64 stays."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-log_softmax(logits)[target]``; unlike ``F.cross_entropy`` it has no
    ``ignore_index``, so a target of -100 is an index error, not an example left out."""
    return -F.log_softmax(logits, 1).gather(1, targets[:, None]).mean()


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
    offset, temperature = _checked("offset", offset), _checked("temperature", temperature, positive=True)
    logits = _checked_logits(logits, targets)
    shifted = logits - offset * _one_hot(targets, logits)
    return _cross_entropy(shifted / temperature, targets) * temperature


def multi_margin_hinge(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean_j relu(margin - (f_y - f_j))`` over the wrong classes ``j``, averaged over the batch.

    Zero exactly when every margin is at least ``margin``, i.e. when the batch is certified at
    the radius that ``margin`` stands for.

    Example:
        >>> z = torch.tensor([[2.0, 0.5, 0.0]])
        >>> float(multi_margin_hinge(z, torch.tensor([0]), margin=1.0))
        0.0
    """
    margin = _checked("margin", margin)
    logits = _checked_logits(logits, targets)
    true = logits.gather(1, targets[:, None])
    wrong = _one_hot(targets, logits) == 0
    gaps = torch.where(wrong, F.relu(margin - (true - logits)), 0.0)
    return gaps.sum(1).div(logits.shape[1] - 1).mean()


def pairwise_lipschitz(weight: torch.Tensor, body_lipschitz: float) -> torch.Tensor:
    """``K[y, j] = body_lipschitz * ||w_y - w_j||``: the Lipschitz constant of ``f_y - f_j``
    for a last layer with (applied) weight ``weight`` ``(K, features)``; differentiable, with a
    zero (not NaN) gradient on the diagonal and for equal rows; half-precision weights give
    float32 constants.

    Example:
        >>> pairwise_lipschitz(torch.eye(2), 1.0)
        tensor([[0.0000, 1.4142],
                [1.4142, 0.0000]])
    """
    body_lipschitz = _checked("body_lipschitz", body_lipschitz)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating (classes, features) matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    # Differences, not the Gram matrix (which cancels for close rows), in O(K^2) memory: the
    # (K, K, features) tensor of differences was gigabytes for ImageNet's 1000 classes.
    weight = _at_least_float32(weight)  # cdist has no half-precision kernels
    return body_lipschitz * torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist")


def pairwise_margin_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float,
                                  pair_lipschitz: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the logits an attack of L2 size ``eps`` could reach, class pair by class pair.

    Each wrong logit is raised by ``e_j K_yj`` with ``e_j = clamp((f_y - f_j) / K_yj, 0, eps)``
    (``eps`` where ``K_yj = 0`` and ``f_y > f_j``; 0 for the true class) held constant (no
    gradient): by as much as a perturbation of size ``eps`` could raise it
    relative to ``f_y`` (``K = pair_lipschitz``, e.g. :func:`pairwise_lipschitz`), but never
    past ``f_y`` (a raise capped there ends exactly at ``f_y``, with the gradient of
    ``f_j + e_j K_yj``), so that classes already beaten at radius ``eps`` stop pulling and those
    closest to the decision boundary get the gradient. The loss is ``temperature`` times the
    cross-entropy of those logits divided by ``temperature``; its gradient reaches ``K`` too,
    so it can also shrink the pair constants the certificate divides by.

    Reference:
        Hu, Zhang, Fredrikson, Klamt. "Unlocking Deterministic Robustness Certification on
        ImageNet", NeurIPS 2023 (Efficient Margin MAximization, EMMA).

    Example:
        >>> z, y, k = torch.tensor([[3.0, 0.0]]), torch.tensor([0]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> bool(pairwise_margin_cross_entropy(z, y, 2.0, k) > pairwise_margin_cross_entropy(z, y, 0.0, k))
        True
    """
    eps, temperature = _checked("eps", eps), _checked("temperature", temperature, positive=True)
    logits = _checked_logits(logits, targets)
    classes = logits.shape[1]
    if pair_lipschitz.shape != (classes, classes):
        raise ValueError(f"pair_lipschitz must be ({classes}, {classes}) for logits of {classes} classes, got shape "
                         f"{tuple(pair_lipschitz.shape)}")
    pairs = pair_lipschitz.to(logits.dtype).index_select(0, targets)  # (N, K): K_yj
    true = logits.gather(1, targets[:, None])
    with torch.no_grad():
        margins = true - logits
        tiny = torch.finfo(logits.dtype).tiny
        # A pair of constant difference (K_yj = 0) is beaten at every radius if f_y > f_j, never
        # otherwise; the true class (margin 0) gets no raise, and so no gradient into K_yy.
        radius = torch.where(pairs > 0, margins / pairs.clamp_min(tiny), torch.where(margins > 0, eps, 0.0))
        reach = radius.clamp(0, eps)
    raised = logits + reach * pairs
    with torch.no_grad():  # (margin / K_yj) K_yj can round past the margin
        past = (raised > true) & (margins >= 0)
    raised = torch.where(past, true.detach() + (raised - raised.detach()), raised)
    return _cross_entropy(raised / temperature, targets) * temperature


class CertifiedMarginLoss(nn.Module):
    """The training loss of a recipe: ``"ce"`` (:func:`offset_cross_entropy`), ``"hinge"``
    (:func:`multi_margin_hinge`) or ``"emma"`` (:func:`pairwise_margin_cross_entropy`).

    Args:
        kind: ``"ce"``, ``"hinge"`` or ``"emma"``.
        eps: the L2 radius (in input units) trained for.
        lipschitz: the Lipschitz bound of the model (e.g. ``1 / min(std)`` of its input
            normalization); turns ``eps`` into the logit margin of ``"ce"`` and ``"hinge"``.
            For ``"emma"``, the bound of the body before the last layer.
        offset: the logit margin itself, overriding ``sqrt(2) * lipschitz * eps`` (not for
            ``"emma"``, whose margins are per class pair).
        temperature: of the cross-entropies (ignored by the hinge).

    ``"emma"`` needs the last layer's applied weight at every step:
    ``loss(logits, targets, last_weight=...)``.
    """

    KINDS = ("ce", "hinge", "emma")

    def __init__(self, kind: str = "ce", eps: float = 0.5, lipschitz: float = 1.0, offset: float | None = None,
                 temperature: float = 1.0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"loss kind must be one of {self.KINDS}, got {kind!r}")
        if kind == "emma" and offset is not None:
            raise ValueError("the 'emma' loss sets its margins per class pair from eps and the last layer; "
                             "it takes no offset (use eps, or the 'ce' loss with an offset)")
        self.kind, self.eps = kind, _checked("eps", eps, what=" (an L2 radius)")
        self.lipschitz = _checked("lipschitz", lipschitz, positive=True, what=" (a Lipschitz bound)")
        self.offset = margin_for(self.eps, self.lipschitz) if offset is None else \
            _checked("offset", offset, what=" (the logit margin asked of the true class over the others)")
        self.temperature = _checked("temperature", temperature, positive=True)

    @property
    def needs_last_weight(self) -> bool:
        """Whether :meth:`forward` needs ``last_weight``."""
        return self.kind == "emma"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                last_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "ce":
            return offset_cross_entropy(logits, targets, self.offset, self.temperature)
        if self.kind == "hinge":
            return multi_margin_hinge(logits, targets, self.offset)
        if last_weight is None:
            raise ValueError("the 'emma' loss needs the last layer's applied weight: loss(logits, targets, "
                             "last_weight=...)")
        if last_weight.dim() != 2 or last_weight.shape[0] != logits.shape[-1]:
            raise ValueError(f"last_weight must be the last layer's (classes, features) weight, one row per logit "
                             f"({logits.shape[-1]}), got shape {tuple(last_weight.shape)}")
        pairs = pairwise_lipschitz(last_weight, self.lipschitz)
        return pairwise_margin_cross_entropy(logits, targets, self.eps, pairs, self.temperature)

    def extra_repr(self) -> str:
        margin = f"eps={self.eps:.4g}, body_lipschitz={self.lipschitz:.4g}" if self.kind == "emma" else \
            f"offset={self.offset:.4g}"
        return f"kind={self.kind!r}, {margin}, temperature={self.temperature}"
