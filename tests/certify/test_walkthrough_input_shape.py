"""A new user's first ``lipschitz_bound`` calls on the README's network: a wrong ``input_shape``
(no channel dimension, a batch dimension, another image size) must be a ``ValueError`` that shows
the shape the user gave, not one quoting a slice of it or torch's matrix-product error."""

import pytest
import torch
from torch import nn

from lipnet.certify import lipschitz_bound
from lipnet.nn import GramConv2d, GramLinear, MaxMin


def readme_model():
    torch.manual_seed(0)
    return nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), GramConv2d(4, 8, 3, stride=2, padding=1), MaxMin(),
                         nn.Flatten(), GramLinear(8 * 14 * 14, 10))


def test_the_right_shape_is_bounded_by_one():
    assert 1 <= lipschitz_bound(readme_model(), (1, 28, 28)) <= 1 + 1e-4


@pytest.mark.parametrize("shape", [(28, 28), (8, 1, 28, 28), (1, 32, 32)],
                         ids=["no-channels", "batch-dimension", "other-size"])
def test_a_wrong_input_shape_is_a_value_error_showing_that_shape(shape):
    with pytest.raises(ValueError, match="without the batch dimension") as error:
        lipschitz_bound(readme_model(), shape)
    assert f"one input of shape {shape}" in str(error.value)
