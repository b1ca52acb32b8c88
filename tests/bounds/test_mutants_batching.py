"""Mutation tests of :mod:`lipnet.bounds.batching`: a vmapped dimension anywhere in the stack,
and constants that may not be vmapped whatever their number."""

import pytest
import torch

from lipnet.bounds.batching import vmap_into_stack


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_stack_vmapped_at_a_later_dimension_is_moved_to_the_front_in_order(dim):
    """``vmap`` may hand over the stack with its vmapped dimension anywhere (the bounds' own
    calls happen to get it at 0): copies ``(V, L, 4, 5)`` given at ``dim`` are each a stack of
    ``L`` whose results come back ``(V, L, ...)``. The vmapped dimension must be moved to the
    front keeping the order of the others: moving the front one to ``dim``, or swapping the
    two, permutes the others for ``dim >= 2``."""
    def apply(stack):
        return stack.sum(-1), stack[..., 0, :]
    copies = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)
    outputs, out_dims = vmap_into_stack(apply, (dim,), copies.movedim(0, dim))
    assert out_dims == (0, 0)
    torch.testing.assert_close(outputs[0], copies.sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], copies[..., 0, :], rtol=0, atol=0)


def test_one_vmapped_constant_among_several_is_refused():
    """The bound's constants are never vmapped: one vmapped constant among unbatched ones is
    refused as two are (whether any, not all, of them is vmapped)."""
    def apply(stack, *constants):
        return (stack.sum(-1),)
    with pytest.raises(ValueError, match="over its weight only"):
        vmap_into_stack(apply, (0, 0, None), torch.zeros(2, 3, 4), torch.zeros(2), None)
    with pytest.raises(ValueError, match="over its weight only"):
        vmap_into_stack(apply, (None, None, 0), torch.zeros(3, 4), None, torch.zeros(2))
