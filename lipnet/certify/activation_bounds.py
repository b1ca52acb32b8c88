"""Lipschitz constants of torch's elementwise activations: ``sup |f'|``, each one proven.

An elementwise map ``y_i = f(x_i)`` with ``f`` absolutely continuous has L2 Lipschitz constant
``sup_x |f'(x)|`` (the Jacobian is diagonal); a per-channel parameter (PReLU) takes the largest
over the channels. An activation with a jump has no Lipschitz constant at all, and is refused.

The constants are those of the mathematical functions with the module's parameters; their
float64 evaluation (a few roundings per entry, relative to the input or the output) is covered
by the rounding bound of :mod:`lipnet.certify.precision`. Where the maximum of ``|f'|`` has no
closed form (SiLU, Mish, GELU's tanh approximation), it lies at the unique positive root of
``f''``, found by bisection in float64, and the value there is raised by
:data:`RELATIVE_MARGIN`, far above the error of the computed root (it enters the value to second
order, ``f'`` being stationary there) and of the evaluation (a few units of ``2^-53``). The test
suite checks every constant against a dense grid of ``f'`` plus a bound on ``|f''|`` times half
the spacing, and that it is within 1e-6 of the sampled maximum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import nn

from lipnet.bounds.rounding import applied_scalar_magnitude
from lipnet.certify.lipschitz import LipschitzBoundError, _constant, _round_up_exact, mul_up, register_lipschitz_bound

#: Relative margin on constants evaluated in float64 at a computed maximiser.
RELATIVE_MARGIN = 2.0 ** -30
#: The SELU constants (Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017), as torch writes them.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
#: Softplus thresholds at least this switch to the identity within one unit roundoff (``e^-34 / 34 < 2^-53``).
SOFTPLUS_MIN_THRESHOLD = 34.0
#: Softplus thresholds at most this keep ``exp(beta x)`` finite below the switch in float32, in
#: which torch computes float32, bfloat16 and float16 softplus (``log(float32 max) ~ 88.72``).
SOFTPLUS_MAX_THRESHOLD = 88.0


def raised(value: float) -> float:
    """``value`` raised by :data:`RELATIVE_MARGIN`, rounded upwards."""
    return mul_up(value, 1 + RELATIVE_MARGIN)


def float_up(value: Fraction) -> float:
    """The smallest float ``>= value`` (``value >= 0``)."""
    return _round_up_exact(float(value), value)


def bisect_root(h: Callable[[float], float], lo: float, hi: float) -> float:
    """A root of ``h`` in ``[lo, hi]``, where ``h(lo) > 0 > h(hi)``, to float64 resolution."""
    if not h(lo) > 0 > h(hi):
        raise ArithmeticError(f"no sign change of the derivative in [{lo}, {hi}]")
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return mid
        lo, hi = (mid, hi) if h(mid) > 0 else (lo, mid)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@functools.cache
def gelu_lipschitz() -> float:
    """``(1 + erf(1)) / 2 + 1 / (e sqrt(pi)) ~ 1.1289``: Lipschitz constant of ``x Phi(x)``.

    ``f' = Phi(x) + x phi(x)`` and ``f'' = phi(x) (2 - x^2)`` (``phi' = -x phi``): ``f'`` rises
    on ``[-sqrt 2, sqrt 2]`` and falls outside, from its limits 0 (at ``-inf``) and 1 (at
    ``+inf``). Its maximum is ``f'(sqrt 2) = Phi(sqrt 2) + sqrt(2) phi(sqrt 2)`` with
    ``Phi(sqrt 2) = (1 + erf(1)) / 2`` and ``sqrt(2) phi(sqrt 2) = e^-1 / sqrt(pi)``; its minimum
    is ``f'(-sqrt 2) = 1 - f'(sqrt 2)`` (``f(x) - f(-x) = x``), smaller in absolute value.
    """
    return raised((1 + math.erf(1.0)) / 2 + 1 / (math.e * math.sqrt(math.pi)))


@functools.cache
def gelu_tanh_lipschitz() -> float:
    """``~1.1290``: Lipschitz constant of ``x T(x)``, ``T = (1 + tanh(u)) / 2``, ``u = k (x + c x^3)``,
    ``k = sqrt(2 / pi)``, ``c = 0.044715`` (torch's ``approximate='tanh'``).

    ``f' = T + x T'`` with ``T' = sech^2(u) u' / 2``, and ``f'' = sech^2(u) h(x)`` with
    ``h = k (1 + 6 c x^2) - x tanh(u) k^2 (1 + 3 c x^2)^2``. ``h`` is even, ``h(0) = k > 0``, and
    for ``x > 0`` it vanishes where ``x tanh(u) * k (1 + 3a)^2 / (1 + 6a) = 1`` (``a = c x^2``):
    both factors increase (``(1 + 3a)^2 / (1 + 6a) = 1 + 9a^2 / (1 + 6a)``), from 0 to infinity,
    so there is one root ``x*``. ``f'`` rises on ``[-x*, x*]`` and falls outside, between its
    limits 0 and 1; ``f'(-x) = 1 - f'(x)`` (``T(x) + T(-x) = 1``), so ``sup |f'| = f'(x*)``.
    """
    k, c = math.sqrt(2 / math.pi), 0.044715

    def slope(x: float) -> float:
        u = k * (x + c * x**3)
        return (1 + math.tanh(u)) / 2 + x * k * (1 + 3 * c * x**2) / (2 * math.cosh(u) ** 2)

    def h(x: float) -> float:
        return k * (1 + 6 * c * x**2) - x * math.tanh(k * (x + c * x**3)) * k**2 * (1 + 3 * c * x**2) ** 2

    return raised(slope(bisect_root(h, 0.0, 4.0)))


@functools.cache
def silu_lipschitz() -> float:
    """``x* sigma(x*) / 2 ~ 1.0998`` with ``x* tanh(x* / 2) = 2``: Lipschitz constant of ``x sigma(x)``.

    ``f' = sigma (1 + x (1 - sigma))`` and ``f'' = sigma (1 - sigma) (2 - x tanh(x / 2))``
    (``1 - 2 sigma(x) = -tanh(x / 2)``). ``x tanh(x / 2)`` is even and increases on ``x > 0``
    from 0 to infinity, so ``f'`` rises on ``[-x*, x*]`` and falls outside, between its limits
    0 and 1. ``f'(-x) = 1 - f'(x)`` (``f(x) - f(-x) = x``), so ``sup |f'| = f'(x*)``, which is
    ``sigma(x*) x* / 2`` because ``x* (2 sigma(x*) - 1) = 2``.
    """
    x = bisect_root(lambda t: 2 - t * math.tanh(t / 2), 0.0, 4.0)
    return raised(_sigmoid(x) * (1 + x * (1 - _sigmoid(x))))


@functools.cache
def mish_lipschitz() -> float:
    """``~1.0885``: Lipschitz constant of ``x tanh(softplus(x))``.

    With ``t = tanh(softplus(x))``, ``t' = sech^2(softplus(x)) sigma(x) > 0``, ``f' = t + x t'`` and
    ``f'' = sech^2(softplus) sigma (2 + x q(x))``, ``q = 1 - sigma (1 + 2 t)``. ``q`` decreases
    (``sigma`` and ``t`` increase) from 1 at ``-inf`` to -2 at ``+inf``, and
    ``q(0) = 1 - (1 + 2 tanh(ln 2)) / 2 = -0.1 < 0``, so its root ``x0`` is negative. For
    ``x > 0``, ``x q`` decreases where ``q < 0`` (``(x q)' = q + x q'``), so ``2 + x q`` has one
    positive root ``x1``; on ``[x0, 0]`` it is ``>= 2``; below ``x0``, ``x q`` increases from
    ``-inf``, so there is one root ``x2 < x0``. ``f'`` falls, rises on ``[x2, x1]``, falls, with
    limits 0 and 1: ``sup |f'| = max(f'(x1), -f'(x2))``.
    """
    def slope(x: float) -> float:
        softplus = math.log1p(math.exp(x))
        return math.tanh(softplus) + x * _sigmoid(x) / math.cosh(softplus) ** 2

    def h(x: float) -> float:  # the sign of f''
        t = math.tanh(math.log1p(math.exp(x)))
        return 2 + x * (1 - _sigmoid(x) * (1 + 2 * t))

    top = slope(bisect_root(h, 0.0, 4.0))
    bottom = slope(bisect_root(lambda x: -h(x), -6.0, -1.0))
    return raised(max(top, -bottom))


@functools.cache
def selu_lipschitz() -> float:
    """``scale * alpha ~ 1.7581``: SELU's slope is ``scale`` for ``x > 0`` and
    ``scale * alpha * e^x < scale * alpha`` below; raised for the float roundings of the constants."""
    return raised(mul_up(SELU_SCALE, SELU_ALPHA))


# ----------------------------------------------------------------------------- registrations


register_lipschitz_bound(nn.SiLU, lambda module, shape: silu_lipschitz())
register_lipschitz_bound(nn.Mish, lambda module, shape: mish_lipschitz())
register_lipschitz_bound(nn.SELU, lambda module, shape: selu_lipschitz())
# Slopes in [0, 1]: log sigmoid (sigma(-x)), tanhshrink (tanh^2 x), softshrink (0 or 1, lambd >= 0).
for _type in (nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink):
    register_lipschitz_bound(_type, _constant(1.0))
# relu6(x + 3) / 6: slopes 0 and 1/6.
register_lipschitz_bound(nn.Hardsigmoid, _constant(float_up(Fraction(1, 6))))


@register_lipschitz_bound(nn.Hardswish)
def _hardswish(module: nn.Hardswish, shape) -> float:
    """3/2: ``x relu6(x + 3) / 6`` is 0 below -3, ``x (x + 3) / 6`` (slope ``(2x + 3) / 6`` in
    ``[-1/2, 3/2]``) on ``[-3, 3]`` and ``x`` above, continuous at -3 and 3."""
    return 1.5


@register_lipschitz_bound(nn.GELU)
def _gelu(module: nn.GELU, shape) -> float:
    if module.approximate == "none":
        return gelu_lipschitz()
    if module.approximate == "tanh":
        return gelu_tanh_lipschitz()
    raise LipschitzBoundError(module, f"GELU with approximate={module.approximate!r} is unknown; use 'none' or 'tanh'")


@register_lipschitz_bound(nn.CELU)
def _celu(module: nn.CELU, shape) -> float:
    """1 for finite ``alpha > 0``: slopes 1 (``x > 0``) and ``e^(x / alpha) <= 1`` (``x <= 0``);
    ``alpha = inf`` computes ``inf * (e^0 - 1) = NaN`` there."""
    if not math.isfinite(float(module.alpha)):
        raise LipschitzBoundError(module, (
            f"CELU with alpha={module.alpha} computes alpha * (exp(x / alpha) - 1) = inf * 0 = NaN for x <= 0: no "
            "Lipschitz constant; use a finite alpha > 0"))
    if not float(module.alpha) > 0:
        raise LipschitzBoundError(module, (
            f"CELU with alpha={module.alpha} has slope e^(x / alpha) for x < 0, which grows without bound "
            "for alpha < 0: no Lipschitz constant; use alpha > 0"))
    return 1.0


@register_lipschitz_bound(nn.Softplus)
def _softplus(module: nn.Softplus, shape) -> float:
    """1: ``log(1 + e^(beta x)) / beta`` has slope ``sigma(beta x)`` in ``(0, 1)``, for any ``beta != 0``.

    torch returns ``x`` itself where ``beta x > threshold``, a jump of
    ``log(1 + e^-threshold) / |beta|`` at the switch: no Lipschitz constant, unless the jump is
    below float64's resolution. For ``beta x > t >= 34`` the identity differs from the smooth
    softplus by ``log(1 + e^-(beta x)) / |beta| <= |x| e^-t / t < 2^-53 |x|``, less than one
    rounding of the input, which :mod:`lipnet.certify.precision` accounts for; the constant is
    the smooth softplus's. Below the switch torch computes ``log1p(exp(beta x)) / beta``, whose
    ``exp`` overflows to inf for ``beta x`` above ``log(float32 max) ~ 88.7`` in float32 (709.8
    in float64): thresholds above :data:`SOFTPLUS_MAX_THRESHOLD` are refused too.
    """
    beta, threshold = float(module.beta), float(module.threshold)
    if beta == 0 or not math.isfinite(beta):
        raise LipschitzBoundError(module, f"Softplus with beta={beta} computes no finite function; use beta != 0")
    if not threshold >= SOFTPLUS_MIN_THRESHOLD:
        jump = math.log1p(math.exp(-threshold)) / abs(beta) if threshold > -700 else math.inf
        raise LipschitzBoundError(module, (
            f"Softplus(beta={beta:g}, threshold={threshold:g}) switches to the identity where beta * x > threshold, "
            f"and its output jumps there by log(1 + exp(-threshold)) / |beta| = {jump:.3g}: a discontinuous map has "
            f"no Lipschitz constant. Use threshold >= {SOFTPLUS_MIN_THRESHOLD:g} (e.g. module.threshold = 40.0; the "
            "outputs change by less than the jump), where the switch is within float64 rounding of the smooth "
            "softplus, whose Lipschitz constant is 1"))
    if threshold > SOFTPLUS_MAX_THRESHOLD:
        raise LipschitzBoundError(module, (
            f"Softplus(beta={beta:g}, threshold={threshold:g}) computes log1p(exp(beta * x)) / beta wherever beta * x "
            f"<= threshold, and exp overflows to inf above log(float32 max) ~ 88.7 (709.8 in float64): its output is "
            f"inf there. Use a threshold between {SOFTPLUS_MIN_THRESHOLD:g} and {SOFTPLUS_MAX_THRESHOLD:g} "
            "(e.g. module.threshold = 40.0)"))
    return 1.0


@register_lipschitz_bound(nn.PReLU)
def _prelu(module: nn.PReLU, shape) -> float:
    """``max(1, max_c |a_c|)``: slopes 1 and the learned ``a_c`` of each channel (exact in float64)."""
    weight = module.weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise LipschitzBoundError(module, "PReLU has a NaN or infinite weight; retrain or reset it")
    return max(1.0, float(weight.double().abs().max()))


@register_lipschitz_bound(nn.RReLU)
def _rrelu(module: nn.RReLU, shape) -> float:
    """``max(1, |lower + upper| / 2)``: in eval mode a leaky ReLU of slope ``(lower + upper) / 2``
    (exact, and as torch rounds it); a bound that is not finite is refused."""
    lower, upper = float(module.lower), float(module.upper)
    if not (math.isfinite(lower) and math.isfinite(upper)):
        raise LipschitzBoundError(module, (
            f"RReLU(lower={lower}, upper={upper}) has a slope (lower + upper) / 2 that is not a finite number in eval "
            "mode, so no Lipschitz constant bounds it; use finite lower and upper"))
    return max(1.0, float_up(abs(Fraction(lower) + Fraction(upper)) / 2), applied_scalar_magnitude((lower + upper) / 2))


@register_lipschitz_bound(nn.Threshold)
def _threshold(module: nn.Threshold, shape) -> float:
    """1 when ``value == threshold`` (then ``max(x, threshold)``); otherwise a jump, refused."""
    if float(module.value) != float(module.threshold):
        raise LipschitzBoundError(module, (
            f"Threshold(threshold={module.threshold}, value={module.value}) jumps by |value - threshold| at x = "
            "threshold: a discontinuous map has no Lipschitz constant; use value == threshold (or nn.ReLU)"))
    return 1.0


@register_lipschitz_bound(nn.Hardshrink)
def _hardshrink(module: nn.Hardshrink, shape) -> float:
    """1 for ``lambd <= 0`` (the identity); for ``lambd > 0`` it jumps by ``lambd`` at ``+-lambd``: refused."""
    if float(module.lambd) > 0:
        raise LipschitzBoundError(module, (
            f"Hardshrink(lambd={module.lambd}) jumps from 0 to +-lambd at x = +-lambd: a discontinuous map has no "
            "Lipschitz constant; use nn.Softshrink (1-Lipschitz)"))
    return 1.0
