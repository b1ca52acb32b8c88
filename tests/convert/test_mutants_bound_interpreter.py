"""Mutation-testing gaps of lipnet.convert.bound_interpreter: the rules of traced bounds on small
graphs, checked as inequalities against their exact Lipschitz constants in rational arithmetic.

Gaps covered: the magnitude of a negative ``alpha``; sums and products rounded upwards; operands
broadcast in sums and products refused; a quotient by a float64 constant that a float32 product
rounds down; NaN and infinite factors refused; and the documented contract of ``_magnitudes``
(integers read exactly, complex magnitudes with a margin of one rounding).
"""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError
from lipnet.convert import traced_lipschitz_bound
from lipnet.convert.bound_interpreter import _magnitudes


class Graph(nn.Module):
    """``fn(self, x)`` behind an identity child, on inputs of the dtype of the ``anchor`` buffer
    (the first floating tensor of the module); ``constants`` become buffers."""

    def __init__(self, fn, dtype=torch.float64, **constants):
        super().__init__()
        self.inner = nn.Identity()
        self.register_buffer("anchor", torch.zeros(1, dtype=dtype))
        for name, value in constants.items():
            self.register_buffer(name, value)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, self.inner(x))


def bound_of(fn, shape=(4,), **kwargs):
    return traced_lipschitz_bound(Graph(fn, **kwargs).eval(), shape)


def test_a_negative_alpha_counts_by_its_magnitude():
    """``torch.sub(c, x, alpha=-2)`` is ``c + 2x``: Lipschitz 2 (in float64 the factor is applied as
    given, so only ``abs(alpha)`` makes the bound positive)."""
    bound = bound_of(lambda m, x: torch.sub(m.anchor, x, alpha=-2.0))
    assert Fraction(bound) >= 2


def test_a_sum_of_bounds_is_rounded_upwards():
    """``0.1 x + 0.4 x``: Lipschitz ``fl(0.1) + fl(0.4)``, a rational that float64 addition rounds down."""
    a, b = 0.1, 0.4
    assert Fraction(a + b) < Fraction(a) + Fraction(b)  # the case the rounding matters for
    bound = bound_of(lambda m, x: x * a + x * b)
    assert Fraction(bound) >= Fraction(a) + Fraction(b)


def test_a_product_of_factors_is_rounded_upwards():
    """``(x * 0.1) * 0.3``: Lipschitz ``fl(0.1) fl(0.3)``, which float64 multiplication rounds down."""
    a, b = 0.1, 0.3
    assert Fraction(a * b) < Fraction(a) * Fraction(b)
    bound = bound_of(lambda m, x: (x * a) * b)
    assert Fraction(bound) >= Fraction(a) * Fraction(b)


@pytest.mark.parametrize("op", ["add", "mul"])
def test_an_input_dependent_operand_broadcast_by_a_constant_is_refused_or_counted(op):
    """``x[:, :1] + c`` and ``x[:, :1] * c`` with ``c`` of 4 entries copy the input entry 4 times:
    Lipschitz ``sqrt(4) = 2`` (times ``max|c| = 1``), not the operand's 1."""
    fn = (lambda m, x: x[:, :1] + m.c) if op == "add" else (lambda m, x: x[:, :1] * m.c)
    try:
        bound = bound_of(fn, c=torch.ones(4, dtype=torch.float64))
    except LipschitzBoundError as error:
        assert "broadcast" in str(error)
        return
    assert Fraction(bound) >= 2


def test_a_quotient_by_a_float64_constant_counts_the_float32_divisor_it_applies():
    """A float32 ``x / c`` with a 0-dim float64 ``c = 3.0000001`` divides by float32's ``3.0``: Lipschitz
    ``1/3``, above ``1/c``."""
    c = torch.tensor(3.0000001, dtype=torch.float64)
    applied = Fraction(float(c.float()))
    assert applied < Fraction(float(c))
    bound = bound_of(lambda m, x: x / m.c, dtype=torch.float32, c=c)
    assert Fraction(bound) * applied >= 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_factor_is_refused(value):
    """``x * c`` with a NaN or infinite entry in ``c`` has no finite bound; it is refused, not given a
    NaN or inf bound."""
    c = torch.tensor([value, 1.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(LipschitzBoundError, match="unbounded factor"):
        bound_of(lambda m, x: x * m.c, c=c)


@pytest.mark.parametrize(("values", "dtype", "big", "small"), [
    ([-3, 1, 2], torch.int64, 3, 1),
    ([-128, 5], torch.int8, 128, 5),
    ([2 ** 53 + 1, 7], torch.int64, 2 ** 53 + 1, 7),
    ([-2, 4], torch.int64, 4, 2),
    ([-(2 ** 63)], torch.int64, 2 ** 63, 2 ** 63),
])
def test_integer_magnitudes_are_read_exactly(values, dtype, big, small):
    """``_magnitudes`` of an integer tensor: ``max|c|`` rounded upwards to a float (``2^53 + 1`` is
    not a float), ``min|c|`` exact; ``abs`` of int8's ``-128`` (itself in int8) is 128. In traced
    bounds the cast of the factor to the product's dtype also counts; this pins the helper itself."""
    got_big, got_small = _magnitudes(torch.tensor(values, dtype=dtype))
    assert Fraction(got_big) >= big and got_big <= math.nextafter(float(big), math.inf)
    assert got_small == small


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_complex_magnitudes_bracket_the_exact_ones(dtype):
    """``_magnitudes`` of complex constants: ``max|c|`` at least, and ``min|c|`` at most, the exact
    magnitudes ``sqrt(re^2 + im^2)`` (compared squared, in rationals); ``abs`` rounds either way,
    and in complex64 with float32's precision."""
    generator = torch.Generator().manual_seed(0)
    values = torch.complex(torch.randn(64, generator=generator, dtype=torch.float64),
                           torch.randn(64, generator=generator, dtype=torch.float64)).to(dtype)
    rounded_down = 0
    for z in values.tolist():
        exact = Fraction(z.real) ** 2 + Fraction(z.imag) ** 2
        big, small = _magnitudes(torch.tensor([z], dtype=dtype))
        assert Fraction(big) ** 2 >= exact and Fraction(small) ** 2 <= exact
        rounded_down += Fraction(float(abs(torch.tensor(z, dtype=dtype)))) ** 2 < exact
    assert rounded_down  # some cases where the margin matters


def test_a_concatenation_bound_is_the_square_root_rounded_upwards():
    """``cat([x, x, x], 1)``: Lipschitz ``sqrt(3)``, which float64's square root rounds down."""
    assert Fraction(math.sqrt(3)) ** 2 < 3
    bound = bound_of(lambda m, x: torch.cat([x, x, x], 1))
    assert Fraction(bound) ** 2 >= 3


def test_a_concatenation_of_many_parts_rounds_its_sum_of_squares_upwards():
    """``cat([c_1 x, ..., c_8 x], 1)``: Lipschitz ``sqrt(sum c_i^2)``; with eight parts the squares
    and their sum rounded to nearest lose more than ``sqrt``'s own upward margin."""
    factors = [0.7, 0.3, 1.1, 0.7, 0.1, 0.7, 0.3, 0.7]
    bound = bound_of(lambda m, x: torch.cat([x * c for c in factors], 1))
    assert Fraction(bound) ** 2 >= sum(Fraction(c) ** 2 for c in factors)


class Unbatching(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child = child
        self.register_buffer("anchor", torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return self.child(x)


@pytest.mark.parametrize("child", [nn.Flatten(0), nn.Unflatten(0, (1, -1))], ids=["flatten", "unflatten"])
def test_a_child_that_moves_the_batch_dimension_is_refused(child):
    """A child whose output does not keep the batch as its first dimension mixes examples: no
    per-example bound exists."""
    with pytest.raises(LipschitzBoundError, match="batch"):
        traced_lipschitz_bound(Unbatching(child).eval(), (4,))


class Transposed(nn.Module):
    """``x.t()``: an isometry of the whole batch that puts the examples' entries in one another's rows."""

    def forward(self, x):
        return x.t()


def test_a_registered_child_that_moves_the_batch_dimension_is_refused(monkeypatch):
    """A registered bound holds whatever the child does with the batch (1 for a transposition, an
    isometry of the batch); the graph must still refuse a child whose output rows are not its
    examples (the built-in bounds refuse such children themselves)."""
    from lipnet.certify import lipschitz

    monkeypatch.setitem(lipschitz._REGISTRY, Transposed, lambda module, shape: 1.0)
    with pytest.raises(LipschitzBoundError, match="does not keep the batch"):
        traced_lipschitz_bound(Unbatching(Transposed()).eval(), (4,))


class Scaled(nn.Module):
    """``x * scale``, traced with ``scale`` at its default (a constant of the graph)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x, scale=1.0):
        return self.inner(x) * scale


class CallsWithScale(nn.Module):
    def __init__(self, keyword):
        super().__init__()
        self.child = Scaled()
        self.keyword = keyword
        self.register_buffer("anchor", torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return self.child(x, scale=3.0) if self.keyword else self.child(x, 3.0)


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_a_child_given_more_than_its_input_is_refused_or_bounded_with_it(keyword):
    """``child(x, 3.0)`` for a child whose own bound takes its extra argument at its default
    (1.0): Lipschitz 3, where the child's bound says 1."""
    try:
        bound = traced_lipschitz_bound(CallsWithScale(keyword).eval(), (4,))
    except LipschitzBoundError as error:
        assert "more than its input" in str(error)
        return
    assert Fraction(bound) >= 3


def test_dropout_that_may_be_active_is_refused_even_when_it_drops_everything():
    """``F.dropout(x, p)`` in training mode scales what it keeps by ``1 / (1 - p)``: refused. With
    ``p`` near 1 it drops every entry of the traced batches, so the graph reproduces the forward and
    only the dropout rule refuses it."""
    with pytest.raises(LipschitzBoundError, match="dropout"):
        bound_of(lambda m, x: torch.nn.functional.dropout(x, 1 - 2 ** -40))


def test_a_broadcast_constant_operand_of_a_sum_is_allowed():
    """``x + c`` and ``c - x`` with a constant ``c`` of shape ``(4,)`` broadcast over the batch:
    only input-dependent operands may not be broadcast; the bound is 1 (exactly: the constant
    counts 0)."""
    c = torch.ones(4, dtype=torch.float64)
    assert bound_of(lambda m, x: x + m.c, c=c) == 1.0
    assert bound_of(lambda m, x: m.c - x, c=c) == 1.0


def _tanh_into_a_constant(m, x):
    c = torch.zeros(x.shape, dtype=x.dtype)
    torch.tanh(x * 1.0, out=c)  # c, a constant node (bound 0), now holds tanh(x)
    return x * 1e-3 + c


def test_a_result_written_into_a_constant_with_out_is_refused():
    """``torch.tanh(x, out=c)`` into a factory's tensor ``c``: the graph reads ``c`` as a constant
    (bound 0), but it holds ``tanh(x)``; ``x / 1000 + c`` has Lipschitz about 1, not ``1e-3``. No
    parameter, buffer or input is written, so only the refusal of ``out=`` stands in the way."""
    module = Graph(_tanh_into_a_constant).eval()
    a = torch.zeros(1, 4, dtype=torch.float64)
    with torch.no_grad():
        assert float((module(a + 1e-3) - module(a)).norm() / (1e-3 * 2)) > 0.5
    with pytest.raises(LipschitzBoundError, match=r"out="):
        traced_lipschitz_bound(module, (4,))


def _resized_factor(m, x):
    c = torch.ones(x.shape[1:], dtype=x.dtype).resize_(8)  # entries 4 to 7: whatever memory held
    return x * c[4:]


def test_a_constant_resized_in_place_is_refused():
    """``resize_`` gives a constant new entries holding arbitrary memory: a factor read from them
    differs from run to run, so no bound taken from one run holds; refused as a memory change."""
    with pytest.raises(LipschitzBoundError, match=r"resize_"):
        bound_of(_resized_factor)


def test_a_factor_of_uninitialized_memory_is_refused():
    """``x * torch.empty(x.shape)``: the factor holds whatever memory was there, a different value
    for every example and every call, so it is refused like a factor read from the batch's shape
    (``torch.full(x.shape, 2.0)`` would be a constant the same for every example)."""
    with pytest.raises(LipschitzBoundError, match="computed from the shape"):
        bound_of(lambda m, x: x * torch.empty(x.shape, dtype=x.dtype))
    assert bound_of(lambda m, x: x * torch.full(x.shape, 2.0, dtype=x.dtype)) == 2.0


def _scales_examples_from_the_fourth(m, x):
    c = torch.ones(x.shape, dtype=x.dtype)
    c[3:].mul_(100.0)  # empty at the traced batch sizes 1 to 3
    return x * c


def test_a_constant_written_in_part_along_the_batch_is_refused():
    """``c = torch.ones(x.shape); c[3:].mul_(100)``: the same for every example at batch sizes 1 to
    3, where the graph is checked, but 100 for the fourth example of a larger batch; ``x * c``
    then has Lipschitz 100 there. Refused, not bounded by 1."""
    module = Graph(_scales_examples_from_the_fourth).eval()
    x = torch.zeros(4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert float((module(x + 1) - module(x))[3].norm() / 2) == 100.0
    with pytest.raises(LipschitzBoundError, match="computed from the shape"):
        traced_lipschitz_bound(module, (4,))



def _scaled_in_place_through_an_alias(m, x):
    h = x * 2.0
    g = h.contiguous()  # the same tensor as h, which is not read again
    return g.mul_(3.0)


def test_an_in_place_write_into_memory_no_later_node_reads_is_allowed():
    """``g = h.contiguous(); g.mul_(3)``: ``g`` is ``h`` itself, but ``h`` is read by no node after
    the write, so no bound is invalidated: allowed, with bound ``2 * 3``."""
    module = Graph(_scaled_in_place_through_an_alias).eval()
    assert traced_lipschitz_bound(module, (4,)) == 6.0
    # The rounding pass keeps every value (h among them) while it runs: the same graph is accepted.
    h = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, error = traced_lipschitz_bound.propagate_rounding(
        module, h, torch.zeros(2, dtype=torch.float64), {}, lambda child, x, e, bounds: (child(x), e))
    assert torch.equal(y, h * 2.0 * 3.0) and bool((error >= 0).all())



def _factor_of_the_dtype_of_a_reshaped_value(m, x):
    y = x.reshape(x.shape[0], 4)  # the batch size as read, where a reshape may take it
    return y * torch.full((4,), 2.0, dtype=y.dtype)


def test_a_factor_given_the_dtype_of_a_value_shaped_by_the_batch_size_is_allowed():
    """The search for shape numbers behind a factor stops at values that depend on the input: the
    factor ``torch.full((4,), 2.0, dtype=y.dtype)`` reads ``y``'s dtype, not the batch size that
    ``y``'s reshape was given, so ``y * factor`` is bounded by 2, not refused."""
    assert bound_of(_factor_of_the_dtype_of_a_reshaped_value) == 2.0


def test_a_rounded_division_by_a_constant_is_refused_for_its_rounding_mode():
    """``x.div(2, rounding_mode='floor')`` is a step function (not Lipschitz): refused, and the
    message should say why (its rounding mode), not that it is a product or quotient of two values
    that depend on the input (only ``x`` does)."""
    with pytest.raises(LipschitzBoundError) as info:
        bound_of(lambda m, x: x.div(2, rounding_mode="floor"))
    assert "two values that depend on the input" not in str(info.value)
    assert "rounding_mode='floor'" in str(info.value) and "step function" in str(info.value)


def test_tanh_of_a_complex_value_is_refused():
    """``tanh(1j * x)`` is ``1j * tan(x)``: slope ``1 / cos(x)^2``, about 200 at ``x = 1.5`` and
    unbounded near ``pi / 2``. The rule "tanh is 1-Lipschitz" holds for real values only."""
    c = torch.tensor(1j, dtype=torch.complex128)
    module = Graph(lambda m, x: torch.tanh(x * m.c), c=c).eval()
    a, step = torch.full((1, 4), 1.5, dtype=torch.float64), 1e-6
    with torch.no_grad():
        slope = float((module(a + step) - module(a)).abs().norm() / (step * 2))  # |d| = step * sqrt(4)
    assert slope > 100
    with pytest.raises(LipschitzBoundError, match="activation of a complex value"):
        traced_lipschitz_bound(module, (4,))


@pytest.mark.parametrize("child", [nn.Tanh(), nn.Sigmoid(), nn.SiLU()])
def test_a_child_module_applied_to_a_complex_value_is_refused(child):
    """Modules' bounds hold for real inputs: complex tanh(1j * x) = 1j * tan(x) has slope 200 at
    x = 1.5, where nn.Tanh's bound is 1 (and nn.Sigmoid's 1/4 against a slope of 0.47)."""
    c = torch.tensor(1j, dtype=torch.complex64)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = child

        def forward(self, x):
            return self.act(x * c)

    with pytest.raises(LipschitzBoundError, match="child module applied to a complex value"):
        traced_lipschitz_bound(Wrapped().eval(), (4,))
