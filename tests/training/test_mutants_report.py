"""Mutation-testing follow-ups for lipnet.training.report: the radius histogram's range, bin
edges and counts, pinned exactly."""

import math

import torch

from lipnet.certify import CertificationResult
from lipnet.training.report import radius_histogram


def result(eps, radii, correct):
    radii, correct = torch.tensor(radii, dtype=torch.float64), torch.tensor(correct)
    return CertificationResult(eps=tuple(eps), clean_accuracy=float(correct.double().mean()),
                               certified=tuple(float(((radii > e) & correct).double().mean()) for e in eps),
                               radii=radii, correct=correct, lipschitz=1.0, body_lipschitz=None, input_shape=(1, 2, 2))


def test_the_range_is_twice_the_largest_eps_and_a_radius_on_an_edge_counts_in_the_bin_above():
    """Range [0, 2 * 0.5] (the largest finite radius, 0.75, is below it); bins [a, b): 0.25 and
    0.5 open their bins; an infinite radius falls in the last bin; a misclassified example only
    in 'misclassified'."""
    histogram = radius_histogram(result((0.1, 0.5), [0.0, 0.05, 0.25, 0.5, 0.75, math.inf],
                                        [False, True, True, True, True, True]), bins=4)
    assert histogram == {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [1, 1, 1, 2], "misclassified": 1}


def test_a_radius_beyond_twice_the_largest_eps_extends_the_range_to_it():
    histogram = radius_histogram(result((0.5,), [0.2, 2.0, 0.0], [True, True, False]), bins=2)
    assert histogram == {"edges": [0.0, 1.0, 2.0], "counts": [1, 1], "misclassified": 1}


def test_every_bin_is_counted_even_when_the_upper_ones_are_empty():
    histogram = radius_histogram(result((1.0,), [0.1, 0.2], [True, True]), bins=4)
    assert histogram == {"edges": [0.0, 0.5, 1.0, 1.5, 2.0], "counts": [2, 0, 0, 0], "misclassified": 0}
