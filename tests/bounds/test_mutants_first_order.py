"""Mutation tests of :mod:`lipnet.bounds.first_order`: ``error_on_backward`` returns a copy,
and ``first_order_backward`` raises its named error exactly when a second derivative would
lose curvature, returning plain gradients, without a graph, otherwise.

A toy Function ``y = 3 x`` with a decorated backward isolates the decorator from the bounds:
its gradient ``3 g`` depends on ``x`` only through the incoming gradient ``g``.
"""

import pytest
import torch

from lipnet.bounds import max_matrix_spectral_norm
from lipnet.bounds.first_order import error_on_backward, first_order_backward


class _Triple(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 3 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    @first_order_backward("the toy map")
    def backward(ctx, grad):
        return (3 * grad,)


class _TripleBare(_Triple):
    """The same map with a backward returning its one gradient bare, not in a tuple (which
    ``torch.autograd.Function`` accepts)."""

    @staticmethod
    @first_order_backward("the toy map")
    def backward(ctx, grad):
        return 3 * grad


def test_error_on_backward_returns_a_copy():
    """The result is a copy: writing into it leaves ``value`` as it was (``value`` may be a
    weight that the caller keeps using)."""
    value, tie = torch.ones(3), torch.zeros(3, requires_grad=True)
    copy = error_on_backward(value, RuntimeError("no"), tie=tie)
    with torch.no_grad():
        copy.add_(1)
    assert value.tolist() == [1.0, 1.0, 1.0]


def test_error_on_backward_without_a_tie_raises_for_the_gradient_of_value():
    """Without ``tie`` (as for the normalized weight of a zero layer) the copy is linked to
    ``value``'s own graph: a gradient through it raises the given error, even when another
    path gives ``value`` a gradient of its own (which would otherwise be returned alone,
    silently missing the copy's part)."""
    value = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss = error_on_backward(value, ValueError("no derivative here")).sum() + value.sum()
    with pytest.raises(ValueError, match="no derivative here"):
        torch.autograd.grad(loss, value)


def test_a_gradient_that_depends_on_nothing_tracked_is_returned_under_create_graph():
    """With ``create_graph=True`` and an incoming gradient that does not require grad (the
    default ``ones``) the toy map's gradient ``3`` depends on nothing: there is no curvature to
    lose, and it is returned as it is."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)  # 18 x exact
    (grad,) = torch.autograd.grad(_Triple.apply(x).sum(), x, create_graph=True)
    assert grad.tolist() == [3.0] * 4


def test_a_second_derivative_through_the_incoming_gradient_raises_naming_the_function():
    """For ``L = sum(3 x)^2`` the incoming gradient ``2 y`` depends on ``x``: the gradient
    ``18 x`` built with ``create_graph=True`` cannot be differentiated through the closed-form
    backward, and saying so names the Function, instead of a generic autograd error or a
    silently wrong Hessian."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)  # 18 x exact
    (grad,) = torch.autograd.grad(_Triple.apply(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(grad.detach(), 18 * x.detach(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="^the toy map has a first-order backward only"):
        torch.autograd.grad(grad.sum(), x)


def test_a_gradient_without_create_graph_carries_no_graph():
    """Without ``create_graph`` a gradient is a plain tensor, as PyTorch's own are: the
    closed-form backward runs without recording its operations (which would keep the
    saved tensors alive and let a later derivative of the gradient pass silently through the
    formula)."""
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(max_matrix_spectral_norm(weight[None]).sum(), weight)
    assert not grad.requires_grad and grad.grad_fn is None


def test_a_bare_gradient_is_wrapped_as_one_gradient():
    """A backward may return the gradient of a Function's one input bare. When a second
    derivative is possible (the incoming gradient ``2 y`` requires grad) the decorator must
    wrap that one tensor, not each of its rows (it did, and autograd failed with "returned an
    incorrect number of gradients"): the gradient ``18 x`` is still given, and only its
    derivative raises."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)  # 18 x exact
    (grad,) = torch.autograd.grad(_TripleBare.apply(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(grad.detach(), 18 * x.detach(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="^the toy map has a first-order backward only"):
        torch.autograd.grad(grad.sum(), x)
