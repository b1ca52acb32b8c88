"""The rounding-error bound of the certification forward pass, term by term, and its use in radii.

:mod:`lipnet.certify.precision` bounds the float64 error of each module by
``r = 4 u K^1.5 (lam ||h|| + ||y||)`` and propagates ``lam * e + r`` through a chain (a
convex residual block: ``|keep| e + |alpha| e_branch`` plus its own three roundings). The
bound is deliberately loose, so comparing it with the actual error cannot tell whether a
term went missing; these tests pin the formula on hand-built inputs and recorded bounds.
The last test checks the whole chain in exact rational arithmetic, with biases so large
that the propagated error, not the logits' own ulps, decides the radii.
"""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import certified_accuracy
from lipnet.certify.precision import (
    UNIT_ROUNDOFF,
    forward_with_error_bound,
    local_rounding_bound,
    rounding_allowance,
)
from lipnet.nn import ConvexResidual, GramLinear

U = 2.0 ** -53


def norms(t):
    return [math.sqrt(sum(v * v for v in row)) for row in t.flatten(1).tolist()]


def formula(h, y, lam):
    """``4 u K^1.5 (lam ||h|| + ||y||)`` per example, ``K = max(numel(h), numel(y)) + 1``, in Python floats."""
    k = max(h[0].numel(), y[0].numel()) + 1
    return [4 * U * k ** 1.5 * (lam * a + b) for a, b in zip(norms(h), norms(y))]


def test_unit_roundoff_is_that_of_float64():
    assert UNIT_ROUNDOFF == U == torch.finfo(torch.float64).eps / 2


@pytest.mark.parametrize("h_shape, y_shape, lam", [((3, 4), (5,), 0.75), ((2,), (2, 3, 3), 2.5), ((7,), (7,), 1.0)])
def test_local_rounding_bound_is_the_documented_formula(h_shape, y_shape, lam):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, *h_shape, dtype=torch.float64, generator=gen) * 3
    y = torch.randn(4, *y_shape, dtype=torch.float64, generator=gen) * 0.5
    got = local_rounding_bound(h, y, lam)
    torch.testing.assert_close(got, torch.tensor(formula(h, y, lam), dtype=torch.float64), rtol=1e-13, atol=0)
    # Both norms count: the input's through lam, the output's alone.
    assert bool((local_rounding_bound(h, y, 2 * lam) > got).all())
    assert bool((local_rounding_bound(h, 2 * y, lam) > got).all())


def affine(n_in, n_out, seed, bias_scale=1.0):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        layer.bias.mul_(bias_scale)
    return layer


def test_a_chain_propagates_the_first_error_through_the_second_bound():
    first, second = affine(6, 5, 0, bias_scale=1e6), affine(5, 3, 1)
    net = nn.Sequential(first, second).eval()
    lam_first, lam_second = 2.5, 0.75  # recorded bounds (any values: the formula is what is tested)
    bounds = {(id(first), (6,)): lam_first, (id(second), (5,)): lam_second}
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        logits, err = forward_with_error_bound(net, x, bounds)
        h = first(x)
        y = second(h)
    assert torch.equal(logits, y)
    r_first = formula(x, h, lam_first)
    r_second = formula(h, y, lam_second)
    expected = [lam_second * a + b for a, b in zip(r_first, r_second)]
    torch.testing.assert_close(err, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


def test_a_convex_residual_block_carries_the_error_of_its_input_on_both_paths():
    first, inner = affine(5, 5, 2, bias_scale=1e8), affine(5, 5, 3)
    block = ConvexResidual(inner, alpha=0.3).double()
    net = nn.Sequential(first, block).eval()
    lam_first, lam_inner = 1.5, 0.9
    bounds = {(id(first), (5,)): lam_first, (id(inner), (5,)): lam_inner}
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        y, err = forward_with_error_bound(net, x, bounds)
        h = first(x)
        out = inner(h)
        keep, alpha = (float(c) for c in block.coefficients())
        mixed = keep * h + alpha * out
    torch.testing.assert_close(y, mixed, rtol=0, atol=0)
    e_in = formula(x, h, lam_first)
    e_branch = [lam_inner * e + r for e, r in zip(e_in, formula(h, out, lam_inner))]
    own = [3 * U * (keep * a + alpha * b + c) for a, b, c in zip(norms(h), norms(out), norms(mixed))]
    expected = [keep * e + alpha * eb + o for e, eb, o in zip(e_in, e_branch, own)]
    assert min(e_in) > max(own)  # the input carries an error of its own: dropping either path shows
    torch.testing.assert_close(err, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


def test_the_allowance_adds_the_propagated_error_to_the_logits_own_rounding():
    logits = torch.tensor([[0.5, -3.0], [200.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    err = torch.tensor([1e-3, 0.0, 2.5], dtype=torch.float64)
    scale = [3.0, 200.0, 1.0]  # max |logit|, at least 1
    expected = [e + 4 * U * s + math.ulp(0.0) for e, s in zip(err.tolist(), scale)]
    torch.testing.assert_close(rounding_allowance(logits, err), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-15, atol=0)


def exact(t):
    return [[Fraction(v) for v in row] for row in t.tolist()]


def test_radii_never_exceed_those_of_the_exact_logits_under_huge_cancelling_biases():
    """Biases of 1e13 cancelled by the last layer: the float64 logits carry errors of about
    1e-3, far above their own ulps. Every certified radius must be at most the radius of the
    exact (rational) logits, and a radius is certified only where the exact model agrees."""
    torch.manual_seed(0)
    first, last = GramLinear(16, 16).double(), GramLinear(16, 2).double()
    net = nn.Sequential(first, last).eval()
    with torch.no_grad():
        first.bias.fill_(1e13)
        last.bias.copy_(-(last.normalized_weight() @ first.bias))
        w1, w2 = exact(first.normalized_weight()), exact(last.normalized_weight())
        b1, b2 = (exact(layer.bias[None])[0] for layer in (first, last))
    x = torch.randn(120, 16, dtype=torch.float64) * 0.05
    logits = []
    for row in exact(x):
        h = [sum(w * v for w, v in zip(weights, row)) + b for weights, b in zip(w1, b1)]
        logits.append([sum(w * v for w, v in zip(weights, h)) + b for weights, b in zip(w2, b2)])
    labels = torch.tensor([0 if z[0] > z[1] else 1 for z in logits])
    result = certified_accuracy(net, (x, labels), eps=[0.0], progress=False)
    assert result.body_lipschitz is not None  # the last-layer radius
    # radius <= (z_0 - z_1) / (L_body ||w_0 - w_1||), squared to stay rational
    scale = Fraction(result.body_lipschitz) ** 2 * sum((a - b) ** 2 for a, b in zip(*w2))
    exceeding = [i for i, (z, radius) in enumerate(zip(logits, result.radii.tolist()))
                 if Fraction(radius) ** 2 * scale > (z[0] - z[1]) ** 2]
    assert not exceeding, (exceeding, result.radii[exceeding])


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e300])
def test_example_norms_neither_underflow_nor_overflow(scale):
    """The squares of activations of 1e-200 underflowed to 0 (a rounding bound of 0 where the
    error is 1e-216, which a later layer with a large bound amplifies) and those of 1e160
    overflowed to inf (an infinite error bound, and NaN after a layer bounded by 0)."""
    from lipnet.certify.precision import example_norms

    h = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64) * scale
    assert example_norms(h).tolist() == [pytest.approx(5 * scale, rel=1e-15), 0.0]
    assert local_rounding_bound(h, h, 0.0)[0] > 0
