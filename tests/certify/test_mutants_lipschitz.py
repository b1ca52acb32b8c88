"""Mutation-testing gaps of lipnet.certify.lipschitz: composed bounds against the exact Lipschitz
constants of maps whose constants are known in rational arithmetic."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound, register_lipschitz_bound
from lipnet.nn import ConvexResidual, GramLinear


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


def test_a_convex_residual_is_bounded_with_its_coefficients_as_the_forward_applies_them():
    """A float32 ``alpha_logit`` mixing a bfloat16 branch: the forward mixes in float32 with the
    coefficients as held (cast to bfloat16 they would be ``0.9765625`` and ``0.0250244...``, summing
    to ``1 + 0.0016``: another function), so with an identity branch ``s I`` the block applies
    ``(keep + alpha s) I`` with the float32 ``keep`` and ``alpha``, rounded to bfloat16 at the end."""
    n = 4
    branch = GramLinear(n, n, bias=False)
    with torch.no_grad():
        branch.weight.copy_(torch.eye(n))
    block = ConvexResidual(branch, alpha=0.025, learnable=False).eval()
    block.branch.to(torch.bfloat16)
    assert block.alpha_logit.dtype == torch.float32
    with torch.no_grad():
        applied = block.branch.normalized_weight().double()
        keep, alpha = (Fraction(float(c)) for c in block.coefficients())
        out = block(torch.eye(n, dtype=torch.bfloat16))
    scale = Fraction(float(applied[0, 0]))
    assert torch.equal(applied, float(scale) * torch.eye(n, dtype=torch.float64))
    exact = keep + alpha * scale
    assert out.dtype == torch.bfloat16
    assert float(out[0, 0]) == float(torch.tensor(float(exact)).to(torch.bfloat16))  # mixed in float32, rounded once
    assert Fraction(lipschitz_bound(block, (n,))) >= exact


def test_a_layer_whose_output_is_nan_gets_no_bound():
    """A GramLinear with a NaN bias: its Gram bound reads the weight only, and is finite, but the
    layer computes NaN, which no Lipschitz constant bounds."""
    layer = GramLinear(4, 4)
    with torch.no_grad():
        layer.bias.fill_(float("nan"))
    with pytest.raises(LipschitzBoundError):
        lipschitz_bound(nn.Sequential(layer, nn.Identity()).eval(), (4,))
