"""Activation bounds: never below sup |f'| (a rigorous grid check), tight, and jumps refused."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.activation_bounds import (
    bisect_root,
    gelu_lipschitz,
    gelu_tanh_lipschitz,
    mish_lipschitz,
    selu_lipschitz,
    silu_lipschitz,
)
from lipnet.nn import GramLinear

#: Rounding of a float64 derivative evaluated by autograd (a few ulps of values below 2).
EVALUATION_ERROR = 1e-13


def slope(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``f'(x)`` of an elementwise module, by autograd in float64 (torch's analytic backward)."""
    x = x.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(module(x).sum(), x)
    return grad


#: More open cells than this after a round: the target is below the supremum (the sound constants leave at
#: most 154,000, in the flat tops of their slopes, and a target below the supremum grows them tenfold a round).
MAX_OPEN_CELLS = 1_000_000


def certified_sup_abs_slope(module, second_derivative_bound, target, lo=-30.0, hi=30.0):
    """``(upper, sampled)``: a proven upper bound on ``sup |f'|`` over ``[lo, hi]`` and the largest sampled value.

    On a cell ``[a, b]``, ``|f'(x)| <= max(|f'(a)|, |f'(b)|) + M (b - a) / 2`` for ``M >= sup |f''|``
    (``x`` is within ``(b - a) / 2`` of an endpoint). Cells whose bound exceeds ``target`` are split
    in ten until none does (then ``upper <= target``), they are too small to settle, or more than
    :data:`MAX_OPEN_CELLS` stay open (a target below the supremum: the refinement would grow tenfold
    each round instead of failing).
    """
    edges = torch.linspace(lo, hi, 60_001, dtype=torch.float64)
    a, b = edges[:-1], edges[1:]
    upper, sampled = 0.0, 0.0
    for _ in range(14):
        ends = torch.maximum(slope(module, a).abs(), slope(module, b).abs())
        sampled = max(sampled, float(ends.max()))
        cell_bound = ends + second_derivative_bound * (b - a) / 2 + EVALUATION_ERROR
        open_cells = cell_bound > target
        if not bool(open_cells.any()) or int(open_cells.sum()) > MAX_OPEN_CELLS:
            return max(upper, float(cell_bound.max())), sampled
        upper = max(upper, float(torch.cat((cell_bound[~open_cells], cell_bound.new_zeros(1))).max()))
        a, b = a[open_cells], b[open_cells]
        steps = torch.linspace(0, 1, 11, dtype=torch.float64)
        points = a[:, None] + (b - a)[:, None] * steps
        a, b = points[:, :-1].flatten(), points[:, 1:].flatten()
    return max(upper, float(cell_bound.max())), sampled


# ``M >= sup |f''|``, proven:
# * GELU, f'' = phi(x) (2 - x^2): at most 2 phi(0) = 0.798 for x^2 <= 4, and phi(x) (x^2 - 2) <= 2 phi(2) beyond.
# * GELU tanh, f'' = sech^2(u) h with |h| <= max(k (1 + 6 c x^2), |x| k^2 (1 + 3 c x^2)^2) (both terms >= 0): for
#   |x| <= 1 (sech^2 <= 1) at most max(k (1 + 6c), k^2 (1 + 3c)^2) = 1.012; for |x| >= 1, with sech^2 u <= 4 e^-2|u|
#   and |u| >= k |x|, both products decrease (negative log-derivatives) from their values 0.82 and 0.62 at |x| = 1.
# * SiLU, f'' = sigma (1 - sigma) (2 - x tanh(x / 2)): at most 2/4 where x tanh(x / 2) <= 4; beyond (|x| > 4),
#   sigma (1 - sigma) x tanh(x / 2) <= |x| e^-|x| < 0.1.
# * Mish, f'' = sech^2(sp) sigma (2 + x q), q in (-2, 1): for x >= 0, sech^2(sp) <= min(1, 4 e^-2x) gives at most
#   (2 + 2x) min(1, 4 e^-2x) <= 2 + 2 ln 2 < 3.39; for x < 0, sigma <= e^x gives e^x (2 + 2|x|) <= 2.
# Beyond |x| = 30 every f' is within 1e-10 of its limit, 0 or 1, below each constant.
SMOOTH = [
    (nn.GELU(), gelu_lipschitz, 0.8),
    (nn.GELU(approximate="tanh"), gelu_tanh_lipschitz, 1.02),
    (nn.SiLU(), silu_lipschitz, 0.5),
    (nn.Mish(), mish_lipschitz, 3.39),
]


@pytest.mark.parametrize(("module", "constant", "second"), SMOOTH, ids=lambda v: repr(v) if isinstance(v, nn.Module)
                         else "")
def test_smooth_constants_are_proven_upper_bounds_and_tight(module, constant, second):
    bound = constant()
    upper, sampled = certified_sup_abs_slope(module, second, target=bound)
    assert upper <= bound
    assert bound - sampled <= 1e-6
    assert lipschitz_bound(module, (7,)) == bound
    # Second derivatives sampled below the proven bounds used above.
    x = torch.linspace(-30, 30, 200_001, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    (again,) = torch.autograd.grad(first.sum(), x)
    assert float(again.abs().max()) <= second


def test_closed_forms():
    assert gelu_lipschitz() == pytest.approx((1 + math.erf(1)) / 2 + math.exp(-1) / math.sqrt(math.pi), rel=1e-8)
    x = bisect_root(lambda t: 2 - t * math.tanh(t / 2), 0.0, 4.0)
    assert x == pytest.approx(2.3994, abs=1e-4)
    assert silu_lipschitz() == pytest.approx(x / (1 + math.exp(-x)) / 2, rel=1e-8)
    with pytest.raises(ArithmeticError):
        bisect_root(lambda t: 1.0, 0.0, 1.0)


def test_selu_is_scale_times_alpha():
    exact = Fraction("1.0507009873554804934193349852946") * Fraction("1.6732632423543772848170429916717")
    assert exact < Fraction(selu_lipschitz()) < exact * (1 + Fraction(1, 10**8))
    x = -torch.logspace(-12, 1, 1000, dtype=torch.float64)
    assert float(slope(nn.SELU(), x).max()) <= selu_lipschitz()


PIECEWISE = [
    (nn.Hardswish(), 1.5),
    (nn.Hardsigmoid(), 1 / 6),
    (nn.LogSigmoid(), 1.0),
    (nn.Tanhshrink(), 1.0),
    (nn.Softshrink(0.7), 1.0),
    (nn.CELU(0.3), 1.0),
    (nn.CELU(4.0), 1.0),
    (nn.Softplus(beta=3.0, threshold=40.0), 1.0),
    (nn.Softplus(beta=-2.0, threshold=34.0), 1.0),
    (nn.Threshold(0.5, 0.5), 1.0),
    (nn.Hardshrink(0.0), 1.0),
    (nn.RReLU(0.1, 0.3), 1.0),
    (nn.RReLU(1.5, 2.5), 2.0),
]


@pytest.mark.parametrize(("module", "expected"), PIECEWISE, ids=lambda v: repr(v) if isinstance(v, nn.Module) else "")
def test_piecewise_constants_bound_the_slopes_and_differences(module, expected):
    bound = lipschitz_bound(nn.Sequential(module), (5,))
    assert Fraction(bound) >= Fraction(expected) or bound == expected
    assert bound <= expected * (1 + 1e-15)
    module.eval()
    x = torch.linspace(-50, 50, 400_001, dtype=torch.float64)
    # torch's Hardsigmoid backward multiplies by 1/6 rounded to float32 (its forward divides by 6 in float64).
    assert float(slope(module, x).abs().max()) <= bound * (1 + 1e-7)
    # Differences of the forward across every kink and switch (rounding: below 1e-9 relative for these steps).
    for step in (1e-5, 1e-2, 1.0):
        y = x + step
        with torch.no_grad():
            ratio = (module(y) - module(x)).abs() / (y - x)
        assert float(ratio.max()) <= bound * (1 + 1e-9)


def test_hardsigmoid_bound_is_at_least_one_sixth():
    assert Fraction(lipschitz_bound(nn.Hardsigmoid(), (3,))) >= Fraction(1, 6)


def test_selu_and_hardswish_slopes_are_reached():
    # The suprema are approached at 0- (SELU) and 3- (Hardswish): the bounds are tight.
    at = torch.tensor([-1e-9, 3 - 1e-9], dtype=torch.float64)
    assert float(slope(nn.SELU(), at[:1])) == pytest.approx(selu_lipschitz(), rel=1e-8)
    assert float(slope(nn.Hardswish(), at[1:])) == pytest.approx(1.5, rel=1e-8)


def test_prelu_reads_its_weights():
    prelu = nn.PReLU(4)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.25, -1.75, 0.5, 1.25]))
    assert lipschitz_bound(prelu, (4, 3)) == 1.75
    assert float(slope(prelu.double(), -torch.rand(2, 4, 3)).abs().max()) == 1.75
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.25, -0.75, 0.5, 0.0]))
    assert lipschitz_bound(prelu, (4, 3)) == 1.0
    with torch.no_grad():
        prelu.weight[0] = float("nan")
    with pytest.raises(LipschitzBoundError, match="NaN"):
        lipschitz_bound(prelu, (4, 3))


@pytest.mark.parametrize(("module", "match"), [
    (nn.Softplus(), "jumps there by log"),
    (nn.Softplus(threshold=-5.0), "threshold >= 34"),
    (nn.Softplus(beta=0.0, threshold=40.0), "beta != 0"),
    (nn.CELU(-1.0), "alpha > 0"),
    (nn.Hardshrink(0.5), "discontinuous"),
    (nn.Threshold(0.1, 20.0), "value == threshold"),
    (nn.GELU(approximate="none"), None),
])
def test_jumps_and_unbounded_slopes_are_refused(module, match):
    net = nn.Sequential(GramLinear(3, 3), module)
    if match is None:
        module.approximate = "cubic"
        match = "approximate='cubic'"
    with pytest.raises(LipschitzBoundError, match=match) as info:
        lipschitz_bound(net, (3,))
    assert info.value.path == "1" and "'1'" in str(info.value)


def test_softplus_default_threshold_really_jumps():
    # In float64 the switch at beta x = 20 is visible: the refusal is not pedantry.
    x = torch.tensor([20.0, math.nextafter(20.0, 30.0)], dtype=torch.float64)
    y = nn.Softplus()(x)
    assert float(y[0] - y[1]) > 1e-9 > 1e3 * float(x[1] - x[0])


def test_composed_in_a_network():
    torch.manual_seed(0)
    net = nn.Sequential(GramLinear(6, 6), nn.GELU(), GramLinear(6, 6), nn.SiLU(), GramLinear(6, 6), nn.Mish(),
                        GramLinear(6, 4), nn.Hardswish())
    bound = lipschitz_bound(net, (6,))
    assert bound >= gelu_lipschitz() * silu_lipschitz() * mish_lipschitz() * 1.5 * 0.99
    assert bound <= gelu_lipschitz() * silu_lipschitz() * mish_lipschitz() * 1.5 * (1 + 1e-5)
    x = torch.randn(512, 6)
    d = 1e-3 * torch.randn(512, 6)
    with torch.no_grad():
        ratio = (net(x + d) - net(x)).norm(dim=1) / d.norm(dim=1)
    assert float(ratio.max()) <= bound


def test_subclass_with_its_own_forward_is_unknown():
    class Doubled(nn.GELU):
        def forward(self, x):
            return 2 * super().forward(x)

    from lipnet.certify import UnknownModuleError

    with pytest.raises(UnknownModuleError):
        lipschitz_bound(Doubled(), (3,))
