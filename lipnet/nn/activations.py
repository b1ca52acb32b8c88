"""1-Lipschitz, gradient-norm-preserving activations."""

from __future__ import annotations

import torch
from torch import nn


def max_min(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """MaxMin (GroupSort with groups of 2): ``(a, b) -> (max(a, b), min(a, b))``.

    The channels along ``dim`` are split into two halves ``a`` and ``b``; each pair
    ``(a_i, b_i)`` is sorted. On every pair this is a permutation, so the map is
    1-Lipschitz in L2 and its Jacobian is orthogonal almost everywhere.

    When a gradient is needed, the pass saves only which pairs were swapped (one byte per
    pair) and the backward applies the same permutation to the gradient: two selections,
    where ``torch.maximum``/``torch.minimum`` and ``torch.cat`` take about twenty operations
    and keep the whole input. At a tie the gradient follows the pair unswapped, so the
    Jacobian is a permutation everywhere and gradient norms are preserved exactly.

    Reference:
        Anil, Lucas, Grosse. "Sorting out Lipschitz function approximation", ICML 2019.

    Example:
        >>> max_min(torch.tensor([[1.0, -2.0, 3.0, 5.0]]))
        tensor([[ 3.,  5.,  1., -2.]])
    """
    if x.shape[dim] % 2:
        raise ValueError(f"MaxMin needs an even number of channels along dim {dim}, got {x.shape[dim]}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxMin.apply(x, dim)
    return _join_halves(x, dim, torch.maximum, torch.minimum)


def _join_halves(x: torch.Tensor, dim: int, first, second) -> torch.Tensor:
    """``cat((first(a, b), second(a, b)), dim)`` for the halves ``(a, b)`` of ``x`` along ``dim``.

    Eager and without autograd, both results are written into one tensor (``out=``: two
    kernels, no concatenation copy); otherwise (autograd, ``torch.compile``, which rejects
    ``out=`` views) the plain concatenation.
    """
    a, b = x.chunk(2, dim=dim)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.cat((first(a, b), second(a, b)), dim=dim)
    out = torch.empty_like(x)
    high, low = out.chunk(2, dim=dim)
    first(a, b, out=high)
    second(a, b, out=low)
    return out


class _MaxMin(torch.autograd.Function):
    """:func:`max_min` as a per-pair permutation: the backward permutes the gradient back."""

    @staticmethod
    def forward(ctx, x, dim):
        a, b = x.chunk(2, dim=dim)
        ctx.save_for_backward(a < b)
        ctx.dim = dim
        return _join_halves(x, dim, torch.maximum, torch.minimum)

    @staticmethod
    def backward(ctx, grad_output):
        (swap,) = ctx.saved_tensors

        # A swap is its own inverse: exchange the gradient's halves where the input's were.
        def high(a, b, out=None):
            return torch.where(swap, b, a, out=out)

        def low(a, b, out=None):
            return torch.where(swap, a, b, out=out)
        return _join_halves(grad_output, ctx.dim, high, low), None


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
