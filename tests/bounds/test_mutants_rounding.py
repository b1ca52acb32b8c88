"""Mutation-testing gaps of lipnet.bounds.rounding: the log-scale term of the margin.

The existing checks of ``relative_rounding_margin`` use layers so large that the Gram-step term
(``inner * rank``) dwarfs the others. For a small layer whose bound is far from 1 (entries near
1e30 or 1e-30 in float32) the documented loss of the carried log-scale, ``(n_iter + 3) |log bound|``
units, is the largest term: dropping it, or reading the bound's logarithm as 0, left every test
passing."""

import math

import pytest
import torch

from lipnet.bounds.rounding import relative_rounding_margin, with_rounding_margin
from lipnet.nn.normalized import CERTIFICATION_N_ITER


def documented_log_scale_worst_case(dtype, n_iter, log_bound):
    """The module docstring's loss of the log-scale, the logarithms and the final exponential:
    a few units of ``u`` per step relative to ``|log bound|`` (counted here as one unit per step
    and three more, less than the margin promises)."""
    return torch.finfo(dtype).eps / 2 * (n_iter + 3) * abs(log_bound)


@pytest.mark.parametrize("dtype, log_bound", [(torch.float32, 69.0), (torch.float32, -69.0), (torch.float64, 69.0),
                                              (torch.float64, 700.0)])
def test_small_layers_far_from_one_get_ten_times_the_log_scale_loss(dtype, log_bound):
    margin = relative_rounding_margin(dtype, inner=1, rank=1, taps=1, n_iter=CERTIFICATION_N_ITER,
                                      log_bound=log_bound)
    worst = documented_log_scale_worst_case(dtype, CERTIFICATION_N_ITER, log_bound)
    assert margin >= 10 * worst


@pytest.mark.parametrize("bound", [1e30, 1e-30, 3.5e25])
def test_with_rounding_margin_reads_the_size_of_the_bound(bound):
    """``with_rounding_margin`` takes ``|log bound|`` from the bound itself: a float32 bound of 1e30
    (``|log| = 69``) needs a margin above ``10 (n + 3) 69 u``, several hundred times what a bound
    near 1 needs."""
    certified = with_rounding_margin(bound, torch.float32, inner=2, rank=2, taps=1, n_iter=CERTIFICATION_N_ITER)
    worst = documented_log_scale_worst_case(torch.float32, CERTIFICATION_N_ITER, math.log(bound))
    assert certified >= bound * (1 + 10 * worst)
