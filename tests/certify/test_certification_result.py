"""``CertificationResult.certified_accuracy(eps)`` counts radii strictly above ``eps``, as
``certified`` does: a misclassified example (radius 0) is never certified, not even at 0."""

import math

import pytest
import torch
from torch import nn

from lipnet.certify import certified_accuracy
from lipnet.certify.accuracy import CertificationResult
from lipnet.nn import GramLinear


def result_with_radii(radii):
    radii = torch.tensor(radii, dtype=torch.float64)
    return CertificationResult(eps=(), clean_accuracy=float((radii > 0).double().mean()), certified=(), radii=radii,
                               correct=radii > 0, lipschitz=1.0, body_lipschitz=None, input_shape=(4,))


def test_a_radius_equal_to_eps_is_not_certified_at_eps():
    result = result_with_radii([0.0, 0.0, 0.25, 0.5])
    assert result.certified_accuracy(0.0) == 0.5
    assert result.certified_accuracy(0.25) == 0.25
    assert result.certified_accuracy(0.5) == 0.0
    assert result.certified_accuracy(0.1) == 0.5


def test_an_empty_result_has_no_accuracy():
    assert math.isnan(result_with_radii([]).certified_accuracy(0.0))


def test_it_agrees_with_certified_at_every_eps_with_misclassified_examples():
    torch.manual_seed(0)
    net = nn.Sequential(GramLinear(4, 3)).eval()
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))  # random labels: many predictions are wrong
    eps = [0.0, 0.05, 0.2]
    result = certified_accuracy(net, (x, y), eps=eps, progress=False)
    assert 0 < result.clean_accuracy < 0.7
    assert torch.all(result.radii[~result.correct] == 0)
    for e, expected in zip(eps, result.certified):
        assert result.certified_accuracy(e) == expected
    assert result.certified_accuracy(0.0) <= result.clean_accuracy
    assert result.certified_accuracy(0.0) == float((result.radii > 0).double().mean())


def test_a_negative_or_nan_eps_is_refused():
    """radius > -0.1 holds for misclassified examples (radius 0) too: certified_accuracy(-0.1)
    was 1.0 for a result whose clean accuracy is 0.5."""
    result = result_with_radii([0.0, 0.0, 0.25, 0.5])
    for eps in (-0.1, math.nan, -math.inf):
        with pytest.raises(ValueError, match="eps"):
            result.certified_accuracy(eps)
    assert result.certified_accuracy(math.inf) == 0.0
