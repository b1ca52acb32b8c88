"""Mutation-testing gaps of lipnet.certify.copy_map_bounds: the check that every output of a
module run on the indices of its input is one of those indices (an integer in range), and the
multiplicities read from the float32 map where it copies more than the float64 one.
"""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.copy_map_bounds import copy_multiplicity


@pytest.mark.parametrize("value", [3.0, -1.0, 0.5, 2.5], ids=["one-past-the-last", "negative", "half", "between"])
def test_an_output_that_is_no_input_index_is_refused(value):
    """A map that writes constants (constant padding by ``value``) on the indices ``0, 1, 2`` of a
    three-entry input: ``3`` is one past the last index, ``-1`` before the first, ``0.5`` and
    ``2.5`` are not integers; none is a copy, so the multiplicity is refused rather than counted
    (``-1`` as a crash of ``bincount``, ``0.5`` as a copy of entry 0)."""
    with pytest.raises(LipschitzBoundError, match="not a copy"):
        copy_multiplicity(nn.ConstantPad1d(1, value), (1, 3))


def test_nearest_upsampling_counts_the_float32_map_where_it_copies_more():
    """Two samples upsampled to 82: torch's CPU kernel copies the first 41 times in float64
    arithmetic and 42 times in float32 (module docstring); the bound is ``sqrt(42)``."""
    module = nn.Upsample(size=82, mode="nearest")
    index = torch.arange(2.0).reshape(1, 1, 2)
    counts = [int(torch.bincount(module(index.to(dtype)).long().flatten()).max())
              for dtype in (torch.float64, torch.float32)]
    assert counts == [41, 42]  # the case the float32 map matters for
    assert copy_multiplicity(module, (1, 2)) == 42
    assert Fraction(lipschitz_bound(module, (1, 2))) ** 2 >= 42


@pytest.mark.parametrize(("module", "shape"), [
    (nn.ZeroPad2d(1), (3, 4)),
    (nn.ConstantPad1d(2, 0.5), (4,)),
    (nn.ReflectionPad1d(2), (5,)),
    (nn.ReplicationPad2d((1, 2, 0, 1)), (3, 4)),
    (nn.CircularPad1d(1), (4,)),
], ids=["zero2d", "constant1d", "reflect1d", "replicate2d", "circular1d"])
def test_padding_as_many_dimensions_as_an_example_has_is_allowed(module, shape):
    """Padding the last ``k`` dimensions of examples with exactly ``k`` (torch reads the batch as
    channels, unbatched): each example is padded by itself, so this is no padding of the batch."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module(x)[1], module(x[1:2])[0])  # per example
    multiplicity = copy_multiplicity(module, shape) if not isinstance(module, nn.ConstantPad1d) and \
        not isinstance(module, nn.ZeroPad2d) else 1
    bound = lipschitz_bound(module, shape)
    assert Fraction(bound) ** 2 >= multiplicity


@pytest.mark.parametrize("module", [nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.CircularPad2d(1)],
                         ids=["reflect", "replicate", "circular"])
def test_copying_padding_that_reaches_the_batch_is_refused(module):
    """Two-dimensional copying padding on one-dimensional examples ``(N, 5)`` would pad the batch
    dimension (torch's copying pads do not even run on such inputs): refused with a
    LipschitzBoundError that names the batch, as for zero padding, not with torch's own error."""
    with pytest.raises((NotImplementedError, ValueError)):
        module(torch.randn(3, 5))
    with pytest.raises(LipschitzBoundError, match="pad the batch dimension"):
        lipschitz_bound(module, (5,))
