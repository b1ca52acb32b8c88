"""1-Lipschitz, gradient-norm-preserving activations."""

from __future__ import annotations

import torch
from torch import nn


def max_min(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """MaxMin (GroupSort with groups of 2): ``(a, b) -> (max(a, b), min(a, b))``.

    The channels along ``dim`` are split into two halves ``a`` and ``b``; each pair
    ``(a_i, b_i)`` is sorted. On every pair this is a permutation, so the map is
    1-Lipschitz in L2 and its Jacobian is orthogonal almost everywhere.

    Reference:
        Anil, Lucas, Grosse. "Sorting out Lipschitz function approximation", ICML 2019.
    """
    if x.shape[dim] % 2:
        raise ValueError(f"MaxMin needs an even number of channels along dim {dim}, got {x.shape[dim]}")
    a, b = x.chunk(2, dim=dim)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=dim)


class MaxMin(nn.Module):
    """Module form of :func:`max_min` (Lipschitz constant 1).

    Example:
        >>> MaxMin()(torch.tensor([[1.0, -2.0, 3.0, 5.0]]))
        tensor([[ 3.,  5.,  1., -2.]])
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_min(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
