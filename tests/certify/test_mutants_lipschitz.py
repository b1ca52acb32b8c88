"""Mutation-testing gaps of lipnet.certify.lipschitz: composed bounds against the exact Lipschitz
constants of maps whose constants are known in rational arithmetic."""

from fractions import Fraction

import torch
from torch import nn

from lipnet.certify import lipschitz_bound, register_lipschitz_bound
from lipnet.nn import ConvexResidual


class _Scale(nn.Module):
    """``x -> c x``: Lipschitz constant exactly ``|c|``."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


register_lipschitz_bound(_Scale, lambda module, shape: abs(module.c))


def test_a_convex_residual_bound_rounds_its_sum_upwards():
    """``(1 - a) x + a c x`` with ``a ~ 2^-30`` and ``c = 1 + 2^-52``: Lipschitz exactly
    ``keep + alpha c`` for the coefficients applied, which float64 rounds down to ``1``."""
    block = ConvexResidual(_Scale(1 + 2.0 ** -52), alpha=2.0 ** -30, learnable=False, dtype=torch.float64).eval()
    keep, alpha = (Fraction(float(c)) for c in block.coefficients())
    exact = keep + alpha * Fraction(1 + 2.0 ** -52)
    assert Fraction(float(exact)) < exact  # the float64 sum is below the exact constant
    assert Fraction(lipschitz_bound(block, (3,))) >= exact


def test_a_product_of_bounds_rounds_upwards():
    """Two maps ``x -> c x`` in sequence, ``c = 1 + 2^-52``: Lipschitz exactly ``c^2 = 1 + 2^-51 + 2^-104``,
    whose float64 product rounds down."""
    c = 1 + 2.0 ** -52
    model = nn.Sequential(_Scale(c), _Scale(c))
    exact = Fraction(c) ** 2
    assert Fraction(c * c) < exact
    assert Fraction(lipschitz_bound(model, (3,))) >= exact
