"""Mutation-testing gaps of lipnet.nn.activations: MaxMin's default pairs the channels of a batch."""

import pytest
import torch

from lipnet.nn import MaxMin


def test_max_min_pairs_the_channels_of_a_batch_by_default():
    """``MaxMin()`` pairs channel ``i`` with channel ``i + C/2`` along dim 1 (``(N, C, H, W)``),
    as its documentation and ``nn.Softmax(dim=1)``-style layers say, not the last dimension."""
    x = torch.randn(2, 4, 3, 6)
    a, b = x[:, :2], x[:, 2:]
    expected = torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)
    torch.testing.assert_close(MaxMin()(x), expected, rtol=0, atol=0)


def test_max_min_refuses_an_input_without_its_dim_with_the_advice():
    """An unbatched feature vector ``(C,)`` has no dim 1: MaxMin says how to count ``dim`` (from
    the end for inputs with or without a batch dimension), instead of an IndexError."""
    with pytest.raises(ValueError, match="dim counts the batch dimension"):
        MaxMin()(torch.randn(4))
