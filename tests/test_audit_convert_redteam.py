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
from lipnet.certify import LipschitzBoundError, lipschitz_bound, register_lipschitz_bound
from lipnet.convert import traced_lipschitz_bound

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


def traced(model, shape):
    """:func:`traced_lipschitz_bound` of ``model`` with its layers converted."""
    converted, _ = convert(model.double().eval())
    return traced_lipschitz_bound(converted, shape)


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


# ----------------------------------------------------------------------------- finding 2: batch-size arithmetic


class Regroups(nn.Module):
    """Reshapes to ``((B - 1) % 3 + 1, -1)``: the batch size B at B = 2 and 3 (the batches the
    graph is traced at), 1 at B = 4, where it puts four examples in one row; the roll that
    follows then moves an entry of one example into another's output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        rows = y.reshape((y.shape[0] - 1) % 3 + 1, -1)
        rolled = torch.cat([rows[:, 1:], rows[:, :1]], 1)
        return rolled.reshape(y.shape[0], -1)


def test_a_size_computed_from_the_batch_size_is_refused():
    model = Regroups().double().eval()
    x = torch.randn(4, 4, dtype=F64)
    moved = x.clone()
    moved[0] += 1.0
    with torch.no_grad():  # only example 0 moved, and example 3's output moved with it
        assert float((model(x)[3] - model(moved)[3]).norm()) > 1e-3
    with pytest.raises(LipschitzBoundError, match="computed from the batch size"):
        traced(model, (4,))
    converted, report = convert(model, input_shape=(4,))
    assert not report.certifiable


@pytest.mark.parametrize("forward", [
    lambda self, x: self.lin(x).split(5, 0)[0],  # every example at B <= 5, the first five at B = 8
    lambda self, x: self.lin(x).chunk(1, -2)[0],
    lambda self, x: self.lin(x).split(x.shape[0], 1)[0],  # B features of each example
    lambda self, x: self.lin(x).view(x.numel() // 4, 4),
], ids=["split(5, 0)", "chunk(1, -2)", "split(B, 1)", "view(numel // 4)"])
def test_splits_along_the_batch_and_sizes_from_the_batch_are_refused(forward):
    """``y.split(5, 0)[0]`` keeps the whole batch at the traced batches (2 and 3) and drops
    examples from 6 on: it was certified (bound 1) though its output has 5 rows at a batch of 8."""
    model = Container(forward).double().eval()
    with pytest.raises(LipschitzBoundError, match="batch"):
        traced(model, (4,))


def test_the_batch_size_read_as_it_is_stays_accepted():
    def forward(self, x):
        y = self.lin(x)
        b, features = x.shape
        y = y.view(x.size(0), features // 2, 2).reshape(x.shape).view(b, -1)
        return torch.reshape(y, (x.shape[0], 2, -1)).flatten(1).split(2, dim=1)[1] * 3.0

    model = Container(forward).double().eval()
    assert 3.0 <= traced(model, (4,)) <= 3.0 * (1 + 1e-5)


# ----------------------------------------------------------------------------- finding 3: Python state


class Gate(nn.Module):
    """Returns its input, and notes in a Python attribute whether it is large."""

    def __init__(self):
        super().__init__()
        self.large = False

    def forward(self, x):
        self.large = bool(x.abs().max() > 50)
        return x


register_lipschitz_bound(Gate, lambda module, shape: 1.0)  # true: it returns its input


class Gated(nn.Module):
    """Scales by 100 where its gate saw a large input: the trace froze ``self.gate.large``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        y = self.gate(self.lin(x))
        if self.gate.large:
            y = y * 100.0
        return y


class Counted(nn.Module):
    """Scales by 100 from its 1000th call on (a warm-up schedule kept in forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (100.0 if self.calls > 1000 else 1.0)


def test_a_flag_a_child_sets_from_its_input_is_refused():
    """Certified 1.000001; the Jacobian at an input of norm 400 is 100."""
    torch.manual_seed(0)
    large = 200 * torch.randn(4, dtype=F64)
    assert assert_sound_or_refused(Gated(), (4,), points=[large]) is None


def test_a_call_counter_is_refused():
    """Certified 1.000001; from the 1000th call on the slope is 100."""
    torch.manual_seed(0)
    model = Counted()
    try:
        converted, bound = converted_bound(model, (4,))
    except LipschitzBoundError as error:
        assert "assigns the attribute 'calls'" in error.reason
        return
    converted.calls = 1000
    assert lower_bound(converted, (4,)) <= bound * (1 + SLACK), f"certified {bound}, slope 100 after 1000 calls"


def test_lipnet_layers_that_note_their_input_size_stay_accepted():
    """A Gram convolution notes its input size in forward (an attribute of a lipnet class)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    assert assert_sound_or_refused(Block(), (2, 4, 4)) is not None
