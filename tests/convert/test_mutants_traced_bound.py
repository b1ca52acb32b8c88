"""Mutation-testing gaps of lipnet.convert's traced bounds: bounds of small graphs against their
exact Lipschitz constants in rational arithmetic."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError
from lipnet.convert import traced_lipschitz_bound


class TimesOneTenth(nn.Module):
    """``x * 0.1`` in the dtype of an unused buffer."""

    def __init__(self, dtype):
        super().__init__()
        self.inner = nn.Identity()
        self.register_buffer("unused", torch.zeros(1, dtype=dtype))

    def forward(self, x):
        return self.inner(x) * 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_product_is_bounded_by_the_float32_factor_it_applies(dtype):
    """Half-precision products with a Python number compute in float32: ``x * 0.1`` multiplies by
    float32's ``0.1`` (``0.100000001490...``, above the float64 ``0.1`` and the half ones)."""
    bound = traced_lipschitz_bound(TimesOneTenth(dtype).eval(), (4,))
    assert Fraction(bound) >= Fraction(float(torch.tensor(0.1, dtype=torch.float32)))


class DividedByThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.register_buffer("unused", torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return self.inner(x) / 3


def test_a_quotient_is_bounded_by_the_reciprocal_rounded_upwards():
    """``x / 3``: Lipschitz exactly ``1 / 3``, which float64 rounds down (to ``0.33333333333333331``)."""
    assert Fraction(traced_lipschitz_bound(DividedByThree().eval(), (4,))) >= Fraction(1, 3)


class OneOver(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x):
        return 2.0 / self.inner(x)


def test_a_number_divided_by_the_input_is_not_bounded_as_a_scaling():
    """``2 / x`` is not Lipschitz (slope ``2 / x^2``): refused, or bounded above every slope seen."""
    module = OneOver().eval()
    try:
        bound = traced_lipschitz_bound(module, (4,))
    except LipschitzBoundError:
        return
    a, b = torch.full((1, 4), 0.01), torch.full((1, 4), 0.02)
    with torch.no_grad():
        slope = float((module(a) - module(b)).norm() / (a - b).norm())
    assert slope <= bound


class LastThree(nn.Module):
    """``x[-3:]``: the whole batch at the traced batch sizes 1 to 3, the last three examples at 4."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x):
        return self.inner(x)[-3:]


def test_slicing_the_batch_is_refused_or_a_per_example_function():
    """A bound holds for one example's function: a graph that slices the batch dimension gives
    the example at position ``i`` the output of another at batch sizes it was not checked at."""
    module = LastThree().eval()
    try:
        traced_lipschitz_bound(module, (4,))
    except LipschitzBoundError:
        return
    x = torch.randn(5, 4)
    with torch.no_grad():
        together = module(x)
        apart = torch.cat([module(x[i:i + 1]) for i in range(len(x))])
    assert together.shape == apart.shape and torch.equal(together, apart)
