"""Certified L2 radii from logits and a Lipschitz bound.

If the logit map ``f`` is ``L``-Lipschitz in L2, then for any ``j != y`` the difference
``f_y - f_j = <e_y - e_j, f>`` is ``sqrt(2) L``-Lipschitz, so the prediction ``y`` cannot
change within

    r = (f_y - max_{j != y} f_j) / (sqrt(2) L)                          (generic form)

(Tsuzuku, Sato, Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018, Prop. 1). When the
last layer is linear, ``f = W h + b`` with ``h`` an ``L_h``-Lipschitz body, the difference
``f_y - f_j = <w_y - w_j, h> + b_y - b_j`` is ``L_h ||w_y - w_j||``-Lipschitz, giving

    r = min_{j != y} (f_y - f_j) / (L_h ||w_y - w_j||)                   (last-layer form),

never smaller than the generic radius since ``||w_y - w_j|| <= sqrt(2) ||W||``.

Rounding: the logits come from a floating-point forward pass, and each is treated as
uncertain by ``delta``, so margins are reduced by ``2 delta``. :func:`certified_accuracy`
passes a proven per-example ``delta`` (``rounding=``) from its float64 forward pass (see
:mod:`lipnet.certify.precision`). For logits given without one, ``delta =
LOGIT_ROUNDING_ULPS * eps(dtype) * max(1, max_j |f_j|)`` (relative 1.2e-4 in float32) is a
heuristic: generous for lipnet's networks in float32, but it scales with the logits, not
with the intermediate activations, and TF32 or bf16 forward passes can exceed it. All
arithmetic is in float64, with the denominators rounded up and the quotients rounded down.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipnet.bounds.rounding import certification_arithmetic
from lipnet.certify.precision import times_power_of_two
from lipnet.nn.normalized import GramNormalized

#: Units of the logits' machine epsilon by which each logit is assumed uncertain.
LOGIT_ROUNDING_ULPS = 1024


def logit_rounding_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per-example uncertainty ``delta`` of the logits (float64, shape ``(N,)``).

    Integer logits are exact, but their conversion to float64 rounds beyond ``2^53``: there
    ``delta`` is half the float64 spacing at the largest logit (``2^-53`` relative).
    """
    if logits.is_floating_point():
        scale = logits.detach().double().abs().amax(dim=1).clamp_min(1.0)
        return LOGIT_ROUNDING_ULPS * torch.finfo(logits.dtype).eps * scale
    largest = logits.detach().double().abs().amax(dim=1)
    return torch.where(largest > 2.0**53, largest * 2.0**-53, 0.0)


def certified_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float | None = None, *,
                     last_layer: nn.Linear | torch.Tensor | None = None,
                     body_lipschitz: float | None = None, rounding: torch.Tensor | None = None) -> torch.Tensor:
    """Certified L2 radius of every prediction; 0 where the prediction is wrong.

    Give either ``lipschitz`` (a sound bound on the Lipschitz constant of the logit map:
    generic form) or ``last_layer`` and ``body_lipschitz`` (last-layer form; see the module
    docstring). The radius is a lower bound on the distance to the nearest input where the
    model's prediction differs from ``labels``.

    Args:
        logits: ``(N, K)`` logits, ``K >= 2``, of any floating dtype.
        labels: ``(N,)`` integer labels in ``[0, K)``.
        lipschitz: certified bound ``L`` of the whole model (from :func:`lipschitz_bound`).
        last_layer: the final linear layer (a :class:`~lipnet.nn.GramLinear` contributes its
            normalized weight, as applied) or its applied ``(K, features)`` weight.
        body_lipschitz: certified bound of everything before ``last_layer``.
        rounding: ``(N,)`` bound on the error of each logit (e.g. the L2 error bound of the
            logit vector); default :func:`logit_rounding_margin`, a heuristic.

    Returns:
        float64 tensor ``(N,)`` of radii on the logits' device.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
        >>> certified_radius(logits, torch.tensor([0, 0]), lipschitz=1.0).round(decimals=3)
        tensor([1.4140, 0.0000], dtype=torch.float64)
    """
    with certification_arithmetic():  # the directed roundings below need subnormals (nextafter(0, inf) > 0)
        return _certified_radius(logits, labels, lipschitz, last_layer=last_layer, body_lipschitz=body_lipschitz,
                                 rounding=rounding)


def _certified_radius(logits, labels, lipschitz, *, last_layer, body_lipschitz, rounding) -> torch.Tensor:
    refuse_functorch_transforms(logits, labels, rounding)
    _check_logits(logits, labels)
    if (lipschitz is None) == (last_layer is None):
        raise ValueError("give either lipschitz=L (generic form) or last_layer=... and body_lipschitz=L_body "
                         "(last-layer form)")
    f = logits.detach().double()
    labels = labels.to(f.device, torch.long)
    if rounding is None:
        rounding = logit_rounding_margin(logits)
    rounding = torch.as_tensor(rounding, dtype=torch.float64, device=f.device)
    if rounding.shape != (f.shape[0],) or not bool((rounding >= 0).all()):
        raise ValueError(f"rounding must hold one error bound >= 0 per example, shape ({f.shape[0]},)")
    own_logit = f.gather(1, labels[:, None])
    margins = own_logit - f - 2 * rounding[:, None]  # (N, K)
    own = torch.nn.functional.one_hot(labels, f.shape[1]).bool()
    if last_layer is None:
        denominator = torch.full_like(f, _round_up(math.sqrt(2) * _check_bound(lipschitz, "lipschitz")))
    else:
        if body_lipschitz is None:
            raise ValueError("the last-layer form needs body_lipschitz, a certified bound of the model without its "
                             "last layer")
        distances = row_distance_upper_bound(applied_weight(last_layer).to(f.device))
        if distances.shape[0] != f.shape[1]:
            raise ValueError(f"last_layer has {distances.shape[0]} outputs but the logits have {f.shape[1]} classes")
        body = _check_bound(body_lipschitz, "body_lipschitz")
        # A constant body (bound 0) fixes every logit difference, also where a distance overflowed (0 * inf).
        denominator = torch.zeros_like(f) if body == 0 else _round_up(body * distances[labels])
    radii = _quotient_down(margins, denominator)
    # A margin beyond the largest float (logits near +-1e308) overflows to inf: halve it (exact
    # for logits that large), divide, and double back; beyond the largest float, the largest float.
    overflow = torch.isposinf(margins)
    if bool(overflow.any()):
        halves = own_logit / 2 - f / 2 - rounding[:, None]
        doubled = (2 * _quotient_down(halves, denominator)).clamp_max(torch.finfo(torch.float64).max)
        radii = torch.where(overflow, doubled, radii)
    # A zero denominator means f_y - f_j never changes: no constraint if its margin is positive.
    radii = torch.where(denominator == 0, torch.where(margins > 0, math.inf, 0.0), radii)
    # A wrong (or tied) prediction has a margin <= -2 delta < 0 for some j, hence radius 0.
    return radii.masked_fill(own, math.inf).amin(dim=1).clamp_min(0.0)


def refuse_functorch_transforms(*tensors) -> None:
    """A ``TypeError`` for tensors of a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``): a
    certificate is computed from concrete values with data-dependent steps (rescaling, overflow and
    zero-denominator branches), which ``vmap`` cannot run (it raised its own "data-dependent control
    flow" error) and which no transform should differentiate; call lipnet.certify outside it."""
    if any(torch.is_tensor(t) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        _refuse_transform()


def refuse_inside_functorch_transforms() -> None:
    """The ``TypeError`` of :func:`refuse_functorch_transforms` whenever a ``torch.func`` transform is
    running, for work done before any transformed tensor is seen (copying a model to float64 writes
    parameters through ``.data``, which a transform refuses with an error of its own)."""
    if torch._C._functorch.maybe_current_level() is not None:
        _refuse_transform()


def _refuse_transform():
    raise TypeError("lipnet.certify cannot run inside a torch.func transform (vmap, grad, jacrev, ...): its "
                    "certificates are computed from concrete values, one call per batch; call it outside the "
                    "transform (on the whole batch: every radius is per example)")


def applied_weight(layer: nn.Linear | torch.Tensor) -> torch.Tensor:
    """The ``(out, in)`` weight a linear layer applies, detached, in float64."""
    if torch.is_tensor(layer):
        weight = layer
    elif isinstance(layer, nn.Linear):
        with torch.no_grad():
            weight = layer.normalized_weight() if isinstance(layer, GramNormalized) else layer.weight
    else:
        raise TypeError(f"last_layer must be an nn.Linear (e.g. GramLinear) or a weight tensor, got "
                        f"{type(layer).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"a linear weight must have shape (out, in), got {tuple(weight.shape)}")
    return weight.detach().double()


def row_distance_upper_bound(weight: torch.Tensor) -> torch.Tensor:
    """``D[y, j] >= ||w_y - w_j||_2`` for the rows of a float64 ``(K, n)`` matrix.

    The differences, squares and sums are computed in float64 (relative error below
    ``(n + 2) u``), the result is multiplied by ``1 + (n + 4) * 2^-52`` and rounded up by an
    ulp. That error bound holds while no square overflows and those that underflow are
    negligible: for distances in ``[2^-400, 2^500]`` (squares that underflow, each below
    ``2^-1022``, change a sum of at least ``2^-800`` by less than ``n 2^-222`` relative).
    Outside that range (a difference of ``1e-200`` squares to 0 and would certify an infinite
    radius) each difference is first scaled by the power of two ``2^-e`` that brings its
    largest entry into ``[1/2, 1)`` (exact), and the result scaled back.
    """
    weight = weight.double()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the last layer's weight has NaN or inf entries: no radius can be certified")
    slack = 1 + (weight.shape[1] + 4) * 2.0**-52
    rows = []
    for y, row in enumerate(weight):
        difference = weight - row
        norms = difference.square().sum(dim=1).sqrt() * slack
        outside = ~((norms >= 2.0**-400) & (norms <= 2.0**500))
        outside[y] = False  # w_y - w_y = 0 exactly
        if bool(outside.any()):
            scaled = difference[outside]
            _, exponent = torch.frexp(scaled.abs().amax(dim=1, keepdim=True))
            scaled = times_power_of_two(scaled, -exponent).square().sum(dim=1).sqrt() * slack
            norms[outside] = times_power_of_two(scaled, exponent[:, 0])
        rows.append(torch.where(norms > 0, _round_up(norms), norms))
    return torch.stack(rows)


def _quotient_down(numerator: torch.Tensor, denominator) -> torch.Tensor:
    """``numerator / denominator`` rounded towards 0."""
    quotient = numerator / denominator
    return torch.nextafter(quotient, torch.zeros_like(quotient))


def _round_up(x):
    if torch.is_tensor(x):
        return torch.nextafter(x, torch.full_like(x, math.inf))
    return math.nextafter(x, math.inf)


def _check_bound(value, name: str) -> float:
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite Lipschitz bound >= 0, got {value}")
    return value


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    for name, value in (("logits", logits), ("labels", labels)):
        if not torch.is_tensor(value):
            # Not converted here: a list of Python floats would become float32, rounded below the
            # values given, and the rounding allowance is taken from the logits' dtype.
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}; convert numpy arrays with "
                            "torch.from_numpy and lists with torch.tensor(..., dtype=...)")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2 classes, got {tuple(logits.shape)}")
    if logits.is_complex():
        raise ValueError(f"logits must be real, got {logits.dtype}: a margin compares real scores")
    if (labels.shape != logits.shape[:1] or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        raise ValueError(f"labels must be {logits.shape[0]} integer labels, got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got values from {int(labels.min())} to "
                         f"{int(labels.max())}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf: no radius can be certified; check the model and its input")
