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


class _TwoHalves(nn.Module):
    """``cat([a(x), b(x)])``: a traced container whose output concatenates two children."""

    def __init__(self, n):
        super().__init__()
        self.a, self.b = nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


# Found as a bug: the concatenation's rule ('cat', [parts]) was unpacked as ('cat', *parts), a TypeError
# on every converted model whose traced forward concatenates; and the parts' errors, combined as
# sqrt(sum e^2), underflowed to 0 for subnormal errors. Now summed.


@pytest.mark.usefixtures("registry")
def test_a_converted_model_with_a_concatenation_is_certified():
    from lipnet import convert
    from lipnet.certify import certified_accuracy

    torch.manual_seed(0)
    model = convert(nn.Sequential(_TwoHalves(4), nn.Linear(8, 3)), input_shape=(4,)).model.eval()
    x = torch.randn(5, 4)
    result = certified_accuracy(model, (x, model(x).argmax(1)), eps=[0.1], progress=False)
    assert result.clean_accuracy == 1.0 and bool((result.radii > 0).any())


@pytest.mark.usefixtures("registry")  # convert registers the container's traced bound process-wide
def test_the_rounding_errors_of_the_parts_of_a_traced_concatenation_are_carried():
    """The certification's float64 pass carries each node's rounding error through a traced graph; a
    concatenation's error is that of its parts together. Two Gram layers whose ``n`` products each
    underflow to 0 (weights ``2^-6``, inputs ``31 2^-1074``, as in
    tests/certify/test_mutants_precision.py): every output is 0 where the exact one is ``31 2^-1074``,
    so the error bound at the concatenation must cover ``2n`` such misses. No other test ran the
    concatenation's rule (an error of 0 there went unnoticed)."""
    from lipnet import convert
    from lipnet.certify.lipschitz import module_lipschitz_bounds
    from lipnet.certify.precision import exact_kernels, forward_with_error_bound

    n = 64
    model = convert(nn.Sequential(_TwoHalves(n)), input_shape=(n,), activation=None).model.double().eval()
    block = model[0]
    with torch.no_grad():
        block.a.weight.fill_(1.0)
        block.b.weight.fill_(1.0)
    x = torch.full((1, n), 31 * 2.0 ** -1074, dtype=torch.float64)
    _, bounds = module_lipschitz_bounds(model, (n,))
    with exact_kernels(), torch.no_grad():
        y, err = forward_with_error_bound(model, x, bounds)
        rows = [row for layer in (block.a, block.b) for row in layer.normalized_weight().tolist()]
    assert y.shape == (1, 2 * n) and bool((y == 0).all())  # every product underflowed to 0
    exact = [sum((Fraction(w) * Fraction(float(x[0, 0])) for w in row), Fraction(0)) for row in rows]
    distance2 = sum(((Fraction(float(c)) - e) ** 2 for c, e in zip(y[0].tolist(), exact)), Fraction(0))
    assert distance2 > 0
    assert Fraction(float(err[0])) ** 2 >= distance2
