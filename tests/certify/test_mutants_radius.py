"""Mutation-testing gaps of lipnet.certify.radius: its rounded quantities against exact rational
arithmetic."""

import math
from fractions import Fraction

import pytest
import torch

from lipnet.certify.radius import certified_radius, row_distance_upper_bound


def test_row_distances_of_long_rows_are_upper_bounds_of_the_exact_ones():
    """``||w_y - w_j||`` of rows of 2048 entries, computed in float64, is off by up to ``(n + 2) u``
    relative, far more than the one ulp it is rounded up by: ``D[y, j]^2`` must still be at least the
    exact sum of squared differences, for every pair."""
    weight = torch.randn(6, 2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distances = row_distance_upper_bound(weight)
    rows = [[Fraction(v) for v in row] for row in weight.tolist()]
    for y in range(len(rows)):
        for j in range(len(rows)):
            exact = sum(((a - b) ** 2 for a, b in zip(rows[y], rows[j])), Fraction(0))
            assert Fraction(float(distances[y, j])) ** 2 >= exact, (y, j)


def test_a_tie_is_not_certified_even_where_the_logits_cannot_change():
    """With ``L = 0`` (generic form) or two equal rows of the last layer, ``f_y - f_j`` never changes;
    a tie ``f_y = f_j`` (exact logits, no rounding allowance) is still not a prediction of ``y``, so
    its radius is 0, while a strict margin holds everywhere. With denormals flushed to zero (a
    setting users turn on for speed, which certified_radius turns off while it runs) the rounded-up
    denominator of ``L = 0`` would be exactly 0."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    exact = torch.zeros(2, dtype=torch.float64)
    weight = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    for flush in (False, True):
        if flush and not torch.set_flush_denormal(True):
            continue  # not supported on this CPU
        try:
            generic = certified_radius(logits, labels, lipschitz=0.0, rounding=exact)
            last_layer = certified_radius(logits, labels, last_layer=weight, body_lipschitz=1.0, rounding=exact)
            # A constant body: the one case whose denominator is exactly 0 (L = 0 and equal rows round it up
            # to the smallest subnormal), where the sign of the margin alone decides.
            constant = certified_radius(logits, labels, last_layer=weight, body_lipschitz=0.0, rounding=exact)
        finally:
            torch.set_flush_denormal(False)
        assert generic[0] == 0.0 and generic[1] > 1e300
        assert last_layer[0] == 0.0 and last_layer[1] > 0
        assert constant.tolist() == [0.0, math.inf]


def generic_radius_holds(radius: float, margin: Fraction, lipschitz: float) -> bool:
    """``radius <= margin / (sqrt(2) L)``, exactly: ``2 r^2 L^2 <= margin^2`` with ``margin > 0``."""
    r = Fraction(radius)
    return r == 0 or (margin > 0 and 2 * r * r * Fraction(lipschitz) ** 2 <= margin * margin)


def test_integer_logits_between_2_53_and_2_54_are_not_taken_as_exact():
    """``2^53 + 3`` and ``2^53 + 1`` become ``2^53 + 4`` and ``2^53`` in float64: a margin of 4 where
    the exact one is 2."""
    logits = torch.tensor([[2**53 + 3, 2**53 + 1]], dtype=torch.int64)
    radius = certified_radius(logits, torch.tensor([0]), lipschitz=1.0)
    assert generic_radius_holds(float(radius[0]), Fraction(2), 1.0)


def test_a_margin_beyond_the_largest_float_keeps_its_whole_rounding_allowance():
    """Logits ``+-1.5e308`` (their difference overflows, so the radius is computed from halves) with
    an allowance ``delta = 1e307`` per logit: the margin is ``3e308 - 2e307``."""
    logits = torch.tensor([[1.5e308, -1.5e308]], dtype=torch.float64)
    delta = torch.tensor([1e307], dtype=torch.float64)
    radius = certified_radius(logits, torch.tensor([0]), lipschitz=2.0, rounding=delta)
    margin = Fraction(1.5e308) - Fraction(-1.5e308) - 2 * Fraction(1e307)
    assert float(radius[0]) > 0
    assert generic_radius_holds(float(radius[0]), margin, 2.0)


def test_a_nan_bound_certifies_nothing():
    """A NaN Lipschitz bound (a diverged model's) bounds nothing: it is refused, or every radius is 0
    (a NaN radius is no certificate either)."""
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    for kwargs in ({"lipschitz": math.nan}, {"last_layer": weight, "body_lipschitz": math.nan}):
        try:
            radii = certified_radius(logits, labels, **kwargs)
        except ValueError:
            continue
        assert radii.tolist() == [0.0, 0.0], kwargs


def test_radii_with_denormals_flushed_to_zero_are_still_upper_bounded():
    """``torch.set_flush_denormal(True)`` (a CPU speed setting) reads the subnormal difference
    ``1e-310`` of two rows of the last layer as 0, and its rounding up (``nextafter(0, inf)``) gives 0:
    the radius was infinite where it is ``1e-10 / 1e-310``. The setting is restored afterwards."""
    logits = torch.tensor([[1e-10, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[1e-310, 0.0], [0.0, 0.0]], dtype=torch.float64)
    if not torch.set_flush_denormal(True):
        pytest.skip("flushing denormals is not supported on this CPU")
    try:
        radius = certified_radius(logits, torch.tensor([0]), last_layer=weight, body_lipschitz=1.0,
                                  rounding=torch.zeros(1, dtype=torch.float64))
        still_flushing = bool(torch.tensor(2.0 ** -1022, dtype=torch.float64) / 2 == 0)
    finally:
        torch.set_flush_denormal(False)
    assert math.isfinite(float(radius[0]))
    assert Fraction(float(radius[0])) * Fraction(1e-310) <= Fraction(1e-10)
    assert still_flushing
