"""Permutations, padding and nearest upsampling: bounds equal the exact operator norms of their dense matrices."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.bounds import affine_map_matrix
from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.copy_map_bounds import copy_multiplicity
from lipnet.nn import GramConv2d


def dense_matrix(module: nn.Module, shape) -> torch.Tensor:
    """The map's matrix in float64, from the responses to each basis vector (minus the response to 0)."""
    with torch.no_grad():
        return affine_map_matrix(module, shape)


def exact_norm(module: nn.Module, shape) -> float:
    """Largest singular value of the map's matrix (computed with a few ulps of rounding)."""
    matrix = dense_matrix(module, shape)
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


CASES = [
    (nn.PixelShuffle(2), (8, 3, 5)),
    (nn.PixelUnshuffle(3), (2, 6, 3)),
    (nn.ChannelShuffle(3), (6, 2, 2)),
    (nn.ZeroPad1d((3, 1)), (2, 4)),
    (nn.ZeroPad2d((1, -2, 0, 3)), (2, 4, 5)),
    (nn.ZeroPad3d(1), (1, 2, 2, 3)),
    (nn.ConstantPad1d((-1, -2), 3.5), (2, 6)),
    (nn.ConstantPad2d(4, -1.0), (1, 2, 1)),
    (nn.ConstantPad3d((1, 0, 2, 0, 0, 1), 0.25), (1, 2, 2, 2)),
    (nn.ReflectionPad1d(2), (3, 5)),
    (nn.ReflectionPad1d((4, 4)), (1, 5)),  # width n - 1 on both sides: the middle entry is copied 3 times
    (nn.ReflectionPad1d((1, 2)), (1, 3)),
    (nn.ReflectionPad1d((-1, 2)), (2, 5)),
    (nn.ReflectionPad2d((2, 2, 1, 1)), (2, 3, 3)),
    (nn.ReflectionPad2d(3), (1, 4, 4)),
    (nn.ReflectionPad2d((0, 3, 1, 0)), (1, 5, 4)),
    (nn.ReflectionPad3d(1), (1, 2, 3, 2)),
    (nn.ReplicationPad1d((5, 0)), (2, 3)),
    (nn.ReplicationPad1d((4, 6)), (1, 1)),
    (nn.ReplicationPad2d((3, 1, 2, 4)), (2, 2, 3)),
    (nn.ReplicationPad2d(5), (1, 1, 1)),
    (nn.ReplicationPad3d((1, 2, 0, 1, 2, 0)), (1, 2, 2, 2)),
    (nn.CircularPad1d(3), (2, 3)),
    (nn.CircularPad2d((2, 1, 0, 2)), (1, 3, 2)),
    (nn.Upsample(scale_factor=2), (2, 3, 3)),
    (nn.Upsample(scale_factor=3), (1, 2, 3)),
    (nn.Upsample(scale_factor=(2, 3)), (1, 3, 2)),
    (nn.Upsample(scale_factor=1.5), (1, 3, 5)),
    (nn.Upsample(scale_factor=0.5), (1, 6, 5)),
    (nn.Upsample(size=(7, 4)), (1, 5, 3)),
    (nn.Upsample(size=(3, 8)), (1, 7, 3)),
    (nn.Upsample(size=(7, 5), mode="nearest-exact"), (1, 3, 4)),
    (nn.Upsample(scale_factor=2.5, mode="nearest", recompute_scale_factor=True), (1, 3, 3)),
    (nn.Upsample(scale_factor=3), (2, 4)),
    (nn.Upsample(size=(3, 3, 5)), (1, 2, 2, 3)),
    (nn.UpsamplingNearest2d(scale_factor=2), (3, 2, 2)),
    (nn.UpsamplingNearest2d(size=(5, 3)), (1, 2, 2)),
]


@pytest.mark.parametrize(("module", "shape"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_bound_equals_the_exact_operator_norm(module, shape):
    bound = lipschitz_bound(module, shape)
    exact = exact_norm(module, shape)
    assert exact * (1 - 1e-14) <= bound <= exact * (1 + 1e-12) + 1e-300  # the SVD's own rounding: a few ulps
    # In exact arithmetic: a 0/1 matrix with at most one 1 per row, whose norm^2 is its largest column count.
    matrix = dense_matrix(module, shape)
    assert bool(((matrix == 0) | (matrix == 1)).all()) and bool((matrix.sum(dim=1) <= 1).all())
    most = int(matrix.sum(dim=0).max()) if matrix.numel() else 0
    assert Fraction(bound) ** 2 >= most and bound <= math.sqrt(most) * (1 + 1e-12) + 1e-300


def test_multiplicities_of_known_maps():
    assert copy_multiplicity(nn.Upsample(scale_factor=(2, 3)), (1, 4, 4)) == 6
    assert copy_multiplicity(nn.ReflectionPad1d(4), (1, 5)) == 3
    assert copy_multiplicity(nn.ReplicationPad2d((2, 3, 1, 0)), (1, 4, 4)) == 4 * 2
    assert copy_multiplicity(nn.ZeroPad2d(-1), (1, 4, 4)) == 1  # a crop (zero padding would read as index 0)
    assert lipschitz_bound(nn.ReplicationPad2d(5), (3, 1, 1)) == 11.000000000000002
    assert lipschitz_bound(nn.Upsample(scale_factor=2), (3, 4, 4)) == 2.0000000000000004


def test_in_a_network_and_in_float32():
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), nn.PixelShuffle(2), nn.ReflectionPad2d(1),
                        nn.Upsample(scale_factor=2), nn.ZeroPad2d(1))
    bound = lipschitz_bound(net, (2, 3, 3))
    # Reflection by 1 copies two entries per axis twice (2), upsampling each entry 4 times (2).
    assert bound <= 2 * 2 * (1 + 1e-5)
    assert bound == pytest.approx(lipschitz_bound(net[0], (2, 3, 3)) * 4, rel=1e-12)
    x, d = torch.randn(64, 2, 3, 3), 1e-3 * torch.randn(64, 2, 3, 3)
    with torch.no_grad():
        ratio = (net(x + d) - net(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound


@pytest.mark.parametrize(("module", "shape", "match"), [
    (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 3, 3), "mode='bilinear' interpolates"),
    (nn.Upsample(scale_factor=2, mode="linear"), (1, 3), "interpolates"),
    (nn.Upsample(scale_factor=2, mode="bicubic"), (1, 3, 3), "interpolates"),
    (nn.Upsample(size=4, mode="area"), (1, 3, 3), "interpolates"),
    (nn.UpsamplingBilinear2d(scale_factor=2), (1, 3, 3), "interpolates"),
    (nn.ZeroPad2d(1), (5,), "pad the batch dimension"),
    (nn.ConstantPad3d(1, 0.0), (2, 3), "pad the batch dimension"),
    (nn.PixelShuffle(2), (4, 3), "between the examples"),
    (nn.PixelUnshuffle(2), (4,), "between the examples"),
])
def test_refusals_name_the_module(module, shape, match):
    net = nn.Sequential(nn.Identity(), module)
    with pytest.raises(LipschitzBoundError, match=match) as info:
        lipschitz_bound(net, shape)
    assert info.value.path == "1" and type(module).__name__ in str(info.value)


def test_batch_padding_really_mixes_examples():
    # Why ZeroPad2d on one-dimensional examples is refused: it pads the batch.
    assert nn.ZeroPad2d(1)(torch.ones(3, 4)).shape == (5, 6)


def test_a_map_that_is_not_a_copy_is_refused():
    class Averaging(nn.ReflectionPad1d):
        def forward(self, x):  # pretend to pad, but average
            return super().forward(x) / 2

    with pytest.raises(LipschitzBoundError, match="not a copy"):
        copy_multiplicity(Averaging(1), (1, 4))


@pytest.mark.parametrize("module", [nn.ReflectionPad2d((2, 3, 1, 2)), nn.ReplicationPad2d(3), nn.CircularPad2d(2),
                                    nn.Upsample(scale_factor=1.7, mode="nearest"),
                                    nn.Upsample(size=(71, 90), mode="nearest-exact")],
                         ids=["reflect", "replicate", "circular", "nearest", "nearest-exact"])
def test_indices_beyond_a_dtypes_exact_integers_are_read_digit_by_digit(module):
    """Above ``2^24`` entries float32 cannot hold every index, so the copy map is read in base-``2^12`` digits.
    Pretending float32 holds integers only up to 100 takes that path on ``2 x 45 x 50 = 4500`` entries (two
    digits, the high one 0 or 1): the map must be the one read in one pass, and the one the module applies."""
    from lipnet.certify.copy_map_bounds import _copied_entries

    shape = (2, 45, 50)
    index = torch.arange(math.prod(shape)).reshape(1, *shape)
    one_pass = _copied_entries(module, index, torch.float32, 2 ** 24)
    by_digits = _copied_entries(module, index, torch.float32, 100)
    assert torch.equal(by_digits, one_pass)
    x = torch.randn(1, *shape)
    assert torch.equal(module(x).flatten(), x.flatten()[by_digits])
    assert by_digits.max() >= 2 ** 12  # the high digit mattered


def test_a_map_that_is_not_a_copy_is_refused_digit_by_digit():
    """The check that every output is one of the digits given holds for each digit: a map that adds 1
    reads digits up to ``2^12``, one past the largest given (``2^12 - 1``)."""
    from lipnet.certify.copy_map_bounds import _copied_entries

    class Shifted(nn.ReflectionPad2d):
        def forward(self, x):
            return super().forward(x) + 1

    index = torch.arange(2 * 45 * 50).reshape(1, 2, 45, 50)
    with pytest.raises(LipschitzBoundError, match="not a copy"):
        _copied_entries(Shifted(1), index, torch.float32, 100)
