"""1-Lipschitz, gradient-norm-preserving activations."""

from __future__ import annotations

import torch
from torch import nn


#: How to pair the channels of inputs with or without a batch dimension.
_UNBATCHED = ("For inputs with or without a batch dimension, count dim from the end: -1 for features (N, C) or (C,), "
              "-2 for (N, C, L) or (C, L), -3 for (N, C, H, W) or (C, H, W)")


def max_min(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """MaxMin (GroupSort with groups of 2): ``(a, b) -> (max(a, b), min(a, b))``.

    The channels along ``dim`` are split into two halves ``a`` and ``b``; each pair
    ``(a_i, b_i)`` is sorted. On every pair this is a permutation, so the map is
    1-Lipschitz in L2 and its Jacobian is orthogonal almost everywhere.

    When a gradient is needed, the pass saves only which pairs were swapped (one byte per
    pair) and the derivative applies the same permutation: three operations backward, where
    autograd through ``torch.maximum``/``torch.minimum`` takes about twenty and keeps the
    whole input. At a tie the pair counts as unswapped, so the Jacobian is a permutation
    everywhere and gradient norms are preserved exactly.

    Reference:
        Anil, Lucas, Grosse. "Sorting out Lipschitz function approximation", ICML 2019.

    Example:
        >>> max_min(torch.tensor([[1.0, -2.0, 3.0, 5.0]]))
        tensor([[ 3.,  5.,  1., -2.]])
    """
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"MaxMin pairs the channels along dim {dim}, which an input of shape {tuple(x.shape)} "
                         f"does not have; dim counts the batch dimension, as in nn.Softmax(dim). {_UNBATCHED}")
    if x.shape[dim] % 2:
        raise ValueError(f"MaxMin needs an even number of channels along dim {dim}, got {x.shape[dim]}")
    if torch.is_grad_enabled() and x.requires_grad:
        # torch.compile traces autograd functions only without a custom forward-mode rule.
        function = _MaxMin if torch.compiler.is_compiling() else _MaxMinForwardMode
        return function.apply(x, dim)[0]
    return _sort_pairs(*x.chunk(2, dim=dim), dim)


def _sort_pairs(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=dim)


def _swap_halves(x: torch.Tensor, swap: torch.Tensor, dim: int) -> torch.Tensor:
    """``x``'s halves ``(a, b)`` along ``dim`` exchanged on the pairs where ``swap``."""
    a, b = x.chunk(2, dim=dim)
    return torch.cat((torch.where(swap, b, a), torch.where(swap, a, b)), dim=dim)


class _MaxMin(torch.autograd.Function):
    """:func:`max_min` as the per-pair permutation it is: returns ``(output, swap)``, and the
    backward (also under ``torch.func`` transforms) permutes the same pairs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        a, b = x.chunk(2, dim=dim)
        return _sort_pairs(a, b, dim), a < b

    @staticmethod
    def setup_context(ctx, inputs, output):
        swap = output[1]
        ctx.dim = inputs[1]
        ctx.mark_non_differentiable(swap)
        ctx.set_materialize_grads(False)  # no zeros for the mask's (absent) gradient
        ctx.save_for_backward(swap)
        ctx.save_for_forward(swap)

    @staticmethod
    def backward(ctx, grad_output, _):
        if grad_output is None:  # grads are not materialized: the output was not used
            return None, None
        (swap,) = ctx.saved_tensors
        return _swap_halves(grad_output, swap, ctx.dim), None  # a swap is its own inverse


class _MaxMinForwardMode(_MaxMin):
    """:class:`_MaxMin` with forward-mode derivatives (``torch.func.jvp``, dual tensors)."""

    @staticmethod
    def jvp(ctx, tangent, _):
        if tangent is None:
            return None, None
        (swap,) = ctx.saved_tensors
        return _swap_halves(tangent, swap, ctx.dim), None


class MaxMin(nn.Module):
    """Module form of :func:`max_min` (Lipschitz constant 1).

    ``dim`` is an index into the input's shape, as in ``nn.Softmax(dim)``: the default
    ``dim=1`` is the channel dimension of a batch ``(N, C, *)``. A layer before it that also
    accepts unbatched inputs (``nn.Conv2d`` takes ``(C, H, W)``) leaves the channels at
    ``dim=0`` of those; to pair the channels of both, count from the end: ``dim=-3`` after a
    2-D convolution, ``-2`` after a 1-D one, ``-1`` after a linear layer. An input that has no dimension
    ``dim`` is refused with this advice; a 3-D input to ``MaxMin(dim=1)`` is taken as
    ``(N, C, L)``.

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
