"""Mutation-testing gaps of lipnet.certify.batch_norm_bound: the per-channel scale bound against exact
decimal arithmetic, for ordinary statistics (not only variances next to ``-eps``)."""

import decimal
import random

from lipnet.certify.batch_norm_bound import channel_scale_bound

CONTEXT = decimal.Context(prec=80)


def exact_scale(gamma: float, var: float, eps: float) -> decimal.Decimal:
    """``|gamma| / sqrt(var + eps)`` of the floats themselves, to 80 digits."""
    denominator = CONTEXT.sqrt(CONTEXT.add(decimal.Decimal(var), decimal.Decimal(eps)))
    return CONTEXT.divide(abs(decimal.Decimal(gamma)), denominator)


def test_channel_scale_bound_is_never_below_the_exact_scale():
    """Each of the sum, the square root and the quotient rounds to nearest by default, below the exact
    value about half of the time: every rounding must be directed so that the bound is an upper one.
    Checked on a few thousand statistics of every magnitude a trained BatchNorm holds."""
    rng = random.Random(0)
    cases = [(1.0, 0.1, 1e-5), (0.3, 3.0, 1e-5), (-2.5, 7.0, 1e-3), (1.0, 1.0, 1.0)]
    for _ in range(4000):
        cases.append((rng.uniform(-4, 4), 10 ** rng.uniform(-8, 4), rng.choice((1e-5, 1e-3, 1e-6, 0.1))))
    below = [case for case in cases if decimal.Decimal(channel_scale_bound(*case)) < exact_scale(*case)]
    assert not below, below[:3]
