"""Mutation-testing gaps of lipnet.nn.residual: ConvexResidual is a convex combination only with one
mixing weight."""

import pytest
import torch
from torch import nn

from lipnet.nn import ConvexResidual


class SwapChannels(nn.Module):
    """The permutation of two channels: an isometry."""

    def forward(self, x):
        return x.flip(1)


def test_a_mixing_weight_per_channel_is_refused():
    """With ``alpha`` near 0 on one channel and near 1 on the other, and a branch that swaps them,
    the block maps ``(x0, x1)`` to about ``(x0, x0)``: norm about ``sqrt(2)``, above the convex
    bound ``(1 - alpha) + alpha Lip(f) = 1``. A one-dimensional ``alpha_logit`` of two entries
    must be refused like any other shape of more than one number."""
    block = ConvexResidual(SwapChannels(), alpha=0.5, learnable=False)
    block.alpha_logit = torch.tensor([-20.0, 20.0]).view(2)
    x = torch.eye(2).view(2, 2)
    with torch.no_grad():
        try:
            y = block(x)
        except ValueError:
            return
    gain = float(torch.linalg.matrix_norm(y.double(), ord=2))  # columns: images of the basis vectors
    assert gain > 1.4  # what a per-channel weight does; it must not get this far
    pytest.fail("a per-channel mixing weight was accepted")
