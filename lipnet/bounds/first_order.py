"""Explicit backward passes that refuse, instead of silently dropping, a second derivative.

The bounds' backward passes (:mod:`lipnet.bounds.gram`, :mod:`lipnet.bounds.conv`) compute
the gradient of the bound in closed form, without a graph of their own. PyTorch's
``once_differentiable`` marks such a gradient with an error node that only fires when the
second derivative is taken with respect to the gradient of the *backward's inputs*; a
Hessian-vector product with respect to the weight reaches the weight by other paths and
silently loses the bound's curvature. :func:`first_order_backward` ties the error to the
incoming gradient instead, which depends on the weight whenever a second derivative through
the bound can be asked for.
"""

from __future__ import annotations

import functools

import torch


class _ErrorOnBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(value, tie, error):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.error = inputs[2]

    @staticmethod
    def backward(ctx, _):
        raise ctx.error


def error_on_backward(value: torch.Tensor, error: Exception, tie: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``value`` whose gradient raises ``error`` when it is asked for (a derivative that
    does not exist, or that the code cannot give): the forward and every other path of the
    graph are unaffected. ``tie``: a tensor that links the copy to the graph where ``value``
    itself does not require grad."""
    return _ErrorOnBackward.apply(value, tie, error)


def first_order_backward(name: str):
    """Decorator for a ``torch.autograd.Function.backward`` with an explicit first-order formula
    (``name`` says whose, in the error): runs it without autograd, and when a graph of the
    backward is being built (``create_graph=True``, which ``torch.func`` transforms always use)
    and a ``grad_output`` or a saved tensor requires grad, returns gradients whose derivative
    raises a clear error. The Function must save the input it differentiates (the weight):
    under nested ``torch.func`` transforms (``jacrev(jacrev(f))``) the incoming gradient does
    not depend on the weight, and only the saved weight links the gradient to the outer level."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            tracked = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not tracked:
                return grads
            error = RuntimeError(
                f"{name} has a first-order backward only: a second derivative through it (create_graph=True followed "
                "by a derivative of the gradient with respect to the weight, e.g. a Hessian-vector product or a penalty "
                "on the weight's gradient) is not available. Penalties on gradients with respect to the input are "
                "supported.")
            if isinstance(grads, torch.Tensor):  # a backward may return its one gradient bare
                return error_on_backward(grads, error, tie=tracked[0])
            return tuple(error_on_backward(g, error, tie=tracked[0]) if isinstance(g, torch.Tensor) else g
                         for g in grads)
        return wrapper
    return decorate
