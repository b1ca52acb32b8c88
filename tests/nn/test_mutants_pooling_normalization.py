"""Mutation-testing gaps of lipnet.nn.normalization and lipnet.nn.pooling: their constants against
exact rational arithmetic."""

import random
from fractions import Fraction

import torch

from lipnet.nn import InputNormalization
from lipnet.nn.pooling import sqrt_up


def test_input_normalization_bound_is_at_least_one_over_the_smallest_std_exactly():
    """``1 / min(std)`` rounded to nearest is below the exact quotient for about half of all stds
    (e.g. ``1 / 3``): the bound must be rounded up, for the std the buffer holds."""
    rng = random.Random(0)
    stds = [3.0, 0.3, 7.0, 0.229, 0.2023] + [rng.uniform(0.01, 10.0) for _ in range(200)]
    for dtype in (torch.float64, torch.float32):
        for std in stds:
            norm = InputNormalization([0.0, 0.0], [std, 2 * std + 1]).to(dtype)
            smallest = Fraction(float(norm.std.double().min()))
            assert Fraction(norm.lipschitz_bound()) >= 1 / smallest, (dtype, std)


def test_sqrt_up_is_at_least_the_exact_square_root():
    """``sqrt_up(v)`` squared is at least ``v`` exactly, for integers and fractions that are not
    squares (``math.sqrt`` rounds to nearest, below the root for about half of them)."""
    values = [Fraction(n) for n in range(2, 400)] + [Fraction(p, q) for p in range(1, 40) for q in range(2, 13)]
    for value in values:
        root = Fraction(sqrt_up(value))
        assert root * root >= value, value


def test_global_scaled_avg_pool_gain_is_within_its_bound_in_float32_and_float64():
    """``GlobalScaledAvgPool2d`` is ``x -> s mean(x)`` per channel, of norm ``s / sqrt(h w)``, attained
    by the constant image, whose output is ``s`` itself as the layer applies it (the mean of ones is
    exactly 1). For areas that are not squares (``sqrt(6)`` rounded to float32 is above ``sqrt(6)``,
    ``sqrt(2)`` in float64 too) that gain must stay within ``lipschitz_bound``, exactly."""
    from lipnet.nn import GlobalScaledAvgPool2d

    pool = GlobalScaledAvgPool2d()
    bound = Fraction(pool.lipschitz_bound())
    for h, w in [(1, 2), (2, 3), (1, 6), (3, 5), (2, 7), (5, 7), (7, 7)]:
        for dtype in (torch.float32, torch.float64):
            gain = Fraction(float(pool(torch.ones(1, 1, h, w, dtype=dtype))[0, 0, 0, 0]))
            assert gain * gain <= bound * bound * (h * w), (h, w, dtype)
