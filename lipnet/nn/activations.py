"""1-Lipschitz, gradient-norm-preserving activations."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.bounds.circulant import is_int


#: How to pair the channels of inputs with or without a batch dimension.
_UNBATCHED = ("For inputs with or without a batch dimension, count dim from the end: -1 for features (N, C) or (C,), "
              "-2 for (N, C, L) or (C, L), -3 for (N, C, H, W) or (C, H, W)")


def _check_dim(x: torch.Tensor, dim: int, action: str) -> None:
    """Refuse a channel dimension ``dim`` that ``x`` does not have, with the advice for
    unbatched inputs (``action``: what the activation does along it, for the message)."""
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{action} the channels along dim {dim}, which an input of shape {tuple(x.shape)} "
                         f"does not have; dim counts the batch dimension, as in nn.Softmax(dim). {_UNBATCHED}")


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
    _check_dim(x, dim, "MaxMin pairs")
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


def group_sort(x: torch.Tensor, group_size: int, dim: int = 1) -> torch.Tensor:
    """GroupSort: each group of ``group_size`` consecutive channels sorted in descending order.

    The channels along ``dim`` are split into consecutive groups (channel ``i`` belongs to
    group ``i // group_size``) and the entries of each group are sorted, largest first.
    ``group_size`` equal to the number of channels sorts them all ("FullSort"). On every group
    this is a permutation, so the map is 1-Lipschitz in L2; its Jacobian is the permutation
    that the sort applied (ties included), so gradient norms are preserved exactly.

    With ``group_size=2`` it sorts the same pairs as :func:`max_min` up to their layout:
    GroupSort pairs neighbours ``(2j, 2j + 1)`` and writes each pair's maximum and minimum
    next to each other, where MaxMin pairs channel ``i`` with ``i + C/2`` and writes the
    maxima in the first half. Unlike MaxMin, the backward keeps the sort's indices (eight
    bytes per entry) instead of one byte per pair.

    Args:
        x: input with its channels along ``dim``.
        group_size: channels per group, an int ``>= 2`` dividing the number of channels.
        dim: the channel dimension, counted with the batch dimension as in ``nn.Softmax(dim)``
            (see :class:`MaxMin`).

    Raises:
        ValueError: ``group_size`` is not an int ``>= 2`` or does not divide the number of
            channels, or ``x`` has no dimension ``dim``.

    Reference:
        Anil, Lucas, Grosse. "Sorting out Lipschitz function approximation", ICML 2019.

    Example:
        >>> group_sort(torch.tensor([[1.0, -2.0, 3.0, 5.0]]), 2)
        tensor([[ 1., -2.,  5.,  3.]])
        >>> group_sort(torch.tensor([[1.0, -2.0, 3.0, 5.0]]), 4)
        tensor([[ 5.,  3.,  1., -2.]])
    """
    _check_group_size(group_size)
    _check_dim(x, dim, "GroupSort groups")
    if x.shape[dim] % group_size:
        raise ValueError(f"GroupSort with group_size={group_size} needs a multiple of {group_size} channels along "
                         f"dim {dim}, got {x.shape[dim]}; choose a group_size that divides the channel count")
    dim %= x.dim()
    return x.unflatten(dim, (-1, group_size)).sort(dim=dim + 1, descending=True).values.flatten(dim, dim + 1)


def _check_group_size(group_size) -> None:
    """Refuse a ``group_size`` of :func:`group_sort` that is not an int ``>= 2``."""
    if not is_int(group_size):
        raise ValueError(f"GroupSort's group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size < 2:
        raise ValueError(f"GroupSort's group_size must be at least 2 (a group of 1 is the identity), got {group_size}")


# torch.fx traces calls of these two as leaves (one call_function node each) in any module whose
# code calls them through this module's globals, such as MaxMin and GroupSort below: tracing into
# them fails on their shape checks, and a graph that keeps them whole says what they are (lipnet's
# traced bounds read them as the permutations they are).
torch.fx.wrap("max_min")
torch.fx.wrap("group_sort")


class GroupSort(nn.Module):
    """Module form of :func:`group_sort` (Lipschitz constant 1).

    ``dim`` is read as in :class:`MaxMin`: an index into the input's shape, ``dim=1`` the
    channels of a batch ``(N, C, *)``; count from the end (``-3`` after a 2-D convolution,
    ``-2`` after a 1-D one, ``-1`` after a linear layer) to group the channels of inputs with
    or without a batch dimension. ``group_size`` is checked here, its divisibility of the
    channel count at each forward.

    Example:
        >>> GroupSort(4)(torch.tensor([[1.0, -2.0, 3.0, 5.0]]))
        tensor([[ 5.,  3.,  1., -2.]])
    """

    def __init__(self, group_size: int, dim: int = 1):
        super().__init__()
        _check_group_size(group_size)
        self.group_size = int(group_size)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_sort(x, self.group_size, self.dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"
