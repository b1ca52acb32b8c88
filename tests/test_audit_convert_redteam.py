"""Red-team audit of :func:`lipnet.convert`: adversarial models are certified soundly or refused.

Each model is converted with an ``input_shape`` and certified with
:func:`lipnet.certify.lipschitz_bound`; either that raises a
:class:`~lipnet.certify.LipschitzBoundError`, or the bound is at least a lower bound on the
true Lipschitz constant of the converted model: the largest singular value of its float64
Jacobian at random, tiny, large and adversarial inputs, and the slopes of random pairs.

The first tests are the findings, each failing before its fix (certified vs true constant in
their docstrings); the rest are patterns that were already right, kept as regression tests.
"""

import pytest
import torch
from torch import nn

from lipnet import convert
from lipnet.certify import LipschitzBoundError, lipschitz_bound

F64 = torch.float64
#: Relative allowance for float64 rounding in a Jacobian or a finite difference.
SLACK = 1e-9


def jacobian_norm(model, x):
    """The largest singular value of the Jacobian of ``model`` at one example ``x`` (float64)."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2))


def lower_bound(model, shape, points=(), seed=0):
    """A lower bound on the Lipschitz constant of ``model``: Jacobian norms at random points of
    several scales, at zero and at ``points``, and the slopes of random close and far pairs."""
    generator = torch.Generator().manual_seed(seed)
    xs = [scale * torch.randn(shape, generator=generator, dtype=F64) for scale in (1.0, 1e-3, 30.0, 300.0)]
    best = max(jacobian_norm(model, x) for x in [*xs, torch.zeros(shape, dtype=F64), *points])
    with torch.no_grad():
        for scale in (1e-4, 1e-1, 3.0):
            a = torch.randn(16, *shape, generator=generator, dtype=F64)
            b = a + scale * torch.randn(16, *shape, generator=generator, dtype=F64)
            ratio = (model(a.clone()) - model(b.clone())).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
            best = max(best, float(ratio.max()))
    return best


def converted_bound(model, shape):
    """``(converted model, its certified bound)``; raises LipschitzBoundError where it is refused."""
    converted, _ = convert(model.double().eval(), input_shape=shape)
    converted = converted.double().eval()
    return converted, lipschitz_bound(converted, shape)


def assert_sound_or_refused(model, shape, points=()):
    """The converted model's certified bound is at least its true constant, or certification raises.
    Returns the bound (None where refused)."""
    try:
        converted, bound = converted_bound(model, shape)
    except LipschitzBoundError:
        return None
    true = lower_bound(converted, shape, points)
    assert true <= bound * (1 + SLACK), f"false certificate: bound {bound!r} < true Lipschitz constant >= {true!r}"
    return bound


class Container(nn.Module):
    """A module with a child (so that convert traces it), buffers and a forward given per test."""

    def __init__(self, forward, **buffers):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        for name, value in buffers.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


# ----------------------------------------------------------------------------- finding 1: c.mul_(y)


@pytest.mark.parametrize("factor, scale", [(100.0, 1e-3), (1e3, 1e-6)])
def test_an_in_place_product_into_a_constant_is_bounded_by_the_constant(factor, scale):
    """``torch.full(x.shape, c).mul_(y)`` leaves ``c * y`` in the constant, and the factor was read
    after the product: max |c y| instead of c. Certified 1.1e-4 for a true constant of 0.1
    (c = 100, y = 1e-3 lin(x)), 9.5e-10 for 1e-3 (c = 1000, y = 1e-6 lin(x))."""
    torch.manual_seed(0)
    model = Container(lambda self, x: torch.full(x.shape, factor, dtype=x.dtype).mul_(self.lin(x) * scale))
    converted, bound = converted_bound(model, (4,))
    true = lower_bound(converted, (4,))
    assert true == pytest.approx(factor * scale, rel=1e-6)
    assert true <= bound * (1 + SLACK)
