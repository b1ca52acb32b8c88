"""Mutation-testing gaps of lipnet.nn.activations: MaxMin's default pairs the channels of a batch."""

import torch

from lipnet.nn import MaxMin


def test_max_min_pairs_the_channels_of_a_batch_by_default():
    """``MaxMin()`` pairs channel ``i`` with channel ``i + C/2`` along dim 1 (``(N, C, H, W)``),
    as its documentation and ``nn.Softmax(dim=1)``-style layers say, not the last dimension."""
    x = torch.randn(2, 4, 3, 6)
    a, b = x[:, :2], x[:, 2:]
    expected = torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)
    torch.testing.assert_close(MaxMin()(x), expected, rtol=0, atol=0)
