"""``torch.func.vmap`` for the bounds' autograd Functions: a vmapped dimension joins the stack.

The bounds already take ``L`` stacked operators and return one result per operator (every
output with a leading ``L``): :func:`lipnet.bounds.conv2d_spectral_norm` on ``(L, ...)``
kernels, :func:`lipnet.bounds.gram.max_gram_bound` on ``(L, B, m, n)`` batches. Under
``vmap`` (ensembles of models, ``torch.func.stack_module_state``) the ``V`` vmapped copies of
a stack of ``L`` are simply a stack of ``V * L``: one call of the same batched operations,
not ``V`` calls. Only the stacked input may be vmapped; the others are constants of the
bound (tap DFTs, lags) that ``vmap`` passes through unbatched.
"""

from __future__ import annotations

from typing import Callable

import torch


def vmap_into_stack(apply: Callable[..., tuple[torch.Tensor, ...]], in_dims: tuple, stack: torch.Tensor, *rest):
    """The ``vmap`` staticmethod of an autograd Function whose first input is a stack ``(L, ...)``
    and whose outputs are tensors ``(L, ...)``: returns ``(outputs, out_dims)``.

    ``apply`` is the Function's ``apply``; ``in_dims`` are ``vmap``'s, one per input."""
    if any(dim is not None for dim in in_dims[1:]):
        raise ValueError("a spectral bound can be vmapped over its weight only, not over its constants")
    dim = in_dims[0]
    if dim is None:
        outputs = apply(stack, *rest)
        return outputs, (None,) * len(outputs)
    stack = stack.movedim(dim, 0)
    copies, layers = stack.shape[:2]
    outputs = apply(stack.flatten(0, 1), *rest)
    return tuple(out.unflatten(0, (copies, layers)) for out in outputs), (0,) * len(outputs)
