"""Directed rounding in ``certified_radius``, checked in exact rational arithmetic.

With ``rounding=0`` the logits are taken as exact, so nothing but the radius computation's
own rounding separates a returned radius from the exact certificate: denominators must be
rounded up and quotients down. The ordinary radius tests use the heuristic allowance,
which is ten orders of magnitude larger and hides an ulp in the wrong direction; here every
radius is compared with the exact quotient as a ``Fraction``. Values of ``L`` that are not
short binary fractions make the roundings visible.
"""

import math
from fractions import Fraction

import pytest
import torch

from lipnet.certify import certified_radius
from lipnet.certify.radius import row_distance_upper_bound

LIPSCHITZ = [1.3, 0.9999, 0.31, 2.1]


def random_logits(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, dtype=torch.float64, generator=gen)
    return logits, logits.argmax(dim=1)


def exact_margins(row, label):
    """``f_y - f_j`` for every ``j != y``, exactly."""
    return {j: Fraction(row[label]) - Fraction(v) for j, v in enumerate(row) if j != label}


@pytest.mark.parametrize("lipschitz", LIPSCHITZ)
def test_generic_radii_never_exceed_the_exact_certificate(lipschitz):
    """``r <= min_j (f_y - f_j) / (sqrt(2) L)``, i.e. ``2 (r L)^2 <= margin^2``."""
    logits, labels = random_logits(3000, 3, seed=0)
    radii = certified_radius(logits, labels, lipschitz=lipschitz, rounding=torch.zeros(len(labels)))
    bound = Fraction(lipschitz)
    for row, label, radius in zip(logits.tolist(), labels.tolist(), radii.tolist()):
        margin = min(exact_margins(row, label).values())
        assert 2 * (Fraction(radius) * bound) ** 2 <= margin ** 2, (row, label, radius)
        assert radius >= float(margin) / (2 ** 0.5 * lipschitz) * (1 - 1e-14)  # and no looser than rounding


@pytest.mark.parametrize("body", LIPSCHITZ)
def test_last_layer_radii_never_exceed_the_exact_certificate(body):
    """``r * L_body * D[y, j] <= f_y - f_j`` for every ``j``, with ``D`` the row-distance bound
    (itself checked against the exact distances below)."""
    logits, labels = random_logits(3000, 3, seed=1)
    weight = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    radii = certified_radius(logits, labels, last_layer=weight, body_lipschitz=body,
                             rounding=torch.zeros(len(labels)))
    distances = [[Fraction(d) for d in row] for row in row_distance_upper_bound(weight).tolist()]
    for row, label, radius in zip(logits.tolist(), labels.tolist(), radii.tolist()):
        margins = exact_margins(row, label)
        for j, margin in margins.items():
            assert Fraction(radius) * Fraction(body) * distances[label][j] <= margin, (row, label, j, radius)
        tightest = min(float(m) / (body * float(distances[label][j])) for j, m in margins.items())
        assert radius >= tightest * (1 - 1e-14)


def test_row_distance_upper_bound_is_above_the_exact_distances():
    """``D[y, j]^2 >= sum_i (w_yi - w_ji)^2`` in rational arithmetic, with no tolerance, for
    long rows (where the float64 sum accumulates most rounding) and for nearly equal rows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 3000, dtype=torch.float64, generator=gen)
    weight[6] = weight[5] + 1e-9 * torch.randn(3000, dtype=torch.float64, generator=gen)
    bound = row_distance_upper_bound(weight).tolist()
    rows = [[Fraction(v) for v in row] for row in weight.tolist()]
    for y in range(len(rows)):
        assert bound[y][y] == 0
        for j in range(y + 1, len(rows)):
            exact_square = sum((a - b) ** 2 for a, b in zip(rows[y], rows[j]))
            assert Fraction(bound[y][j]) ** 2 >= exact_square, (y, j)
            assert Fraction(bound[j][y]) ** 2 >= exact_square, (j, y)


def exact_sqrt(square: Fraction) -> float:
    """``sqrt(square)`` to float64 precision, also where ``square`` is outside float64's range."""
    if square == 0:
        return 0.0
    k = (square.numerator.bit_length() - square.denominator.bit_length()) // 2
    return math.ldexp(math.sqrt(square / Fraction(4) ** k), k)


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 3e-162, 2.0 ** -1070, 1e150, 1e300])
def test_row_distance_upper_bound_survives_underflow_and_overflow(scale):
    """Rows whose differences square below the smallest float64 (or into its subnormals) or
    above the largest: the bound still holds exactly and stays tight; a tiny difference taken
    for 0 made the last-layer radius 1.8e308 where the exact one is about 1e200."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 5, dtype=torch.float64, generator=gen) * scale
    bound = row_distance_upper_bound(weight).tolist()
    rows = [[Fraction(v) for v in row] for row in weight.tolist()]
    distances = [[exact_sqrt(sum((a - b) ** 2 for a, b in zip(u, v))) for v in rows] for u in rows]
    for y in range(3):
        for j in range(3):
            exact_square = sum((a - b) ** 2 for a, b in zip(rows[y], rows[j]))
            assert Fraction(bound[y][j]) ** 2 >= exact_square, (y, j)
            assert bound[y][j] <= distances[y][j] * (1 + 1e-12) + 2.0 ** -1072, (y, j)  # and as tight
    logits = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    radius = certified_radius(logits, torch.tensor([0]), last_layer=weight, body_lipschitz=1.0,
                              rounding=torch.zeros(1)).item()
    assert radius <= min(1 / distances[0][1], 1 / distances[0][2])


def test_margins_above_the_largest_float_are_not_taken_as_infinite():
    """Logits of +-1e308 have a margin of 2e308, which overflows float64: the radius came out
    1.8e308 where the exact one is 2e308 / (2 sqrt 2) = 7.1e307 (and 5e307 in the last-layer form)."""
    logits, labels = torch.tensor([[1e308, -1e308, -1e308]], dtype=torch.float64), torch.tensor([0])
    margin = 2 * Fraction(1e308)
    generic = certified_radius(logits, labels, lipschitz=2.0, rounding=torch.zeros(1)).item()
    assert 8 * Fraction(generic) ** 2 <= margin ** 2 and generic > 7.07e307 * (1 - 1e-12)
    weight = torch.tensor([[1.0], [0.0], [1.0 - 2.0**-20]], dtype=torch.float64)
    last = certified_radius(logits, labels, last_layer=weight, body_lipschitz=4.0, rounding=torch.zeros(1)).item()
    assert Fraction(last) * 4 <= margin and last > 5e307 * (1 - 1e-12)
    huge = certified_radius(logits, labels, lipschitz=2.0**-20, rounding=torch.zeros(1)).item()
    assert huge == torch.finfo(torch.float64).max  # a true lower bound of the exact 7.4e313


def test_integer_logits_beyond_two_to_the_53_are_not_taken_as_exact():
    """int64 logits 2^60 + 256 and 2^60 + 127 differ by 129, but in float64 the second rounds to
    2^60 and the margin read 256: the radius was 181, twice the exact 91."""
    logits, labels = torch.tensor([[2**60 + 256, 2**60 + 127]]), torch.tensor([0])
    radius = certified_radius(logits, labels, lipschitz=1.0).item()
    assert 2 * Fraction(radius) ** 2 <= 129 ** 2
    small = torch.tensor([[5, 2]], dtype=torch.int32)  # exact in float64: no allowance
    assert certified_radius(small, labels, lipschitz=1.0).item() == pytest.approx(3 / 2 ** 0.5, rel=1e-15)
