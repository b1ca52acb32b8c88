"""Mutation-testing gaps of lipnet.bounds.reference (the test oracle) and lipnet.bounds.switch.

test_reference checks the circulant fast path on the cases it is meant for; here the cases it
must not take are pinned (circular stride 2, output of another size in one dimension only), as is
PyTorch's refusal of a circular padding that wraps more than once, which the fast path alone
would not raise. ``conv1d_apply`` must apply ``nn.Conv1d`` exactly for every padding mode ('same'
with an odd total puts the extra sample on the right, 'valid', integers), and
``exact_conv1d_spectral_norm`` must count grouped inputs. ``conv2d_power_iteration`` returns
``||A v||`` for its final unit vector (a lower bound, even after no iteration) and 0 for a zero
kernel. ``Switch.scoped`` restores the previous value also when it equals the one set.
"""

import pytest
import torch
from torch import nn

from lipnet.bounds.reference import (affine_map_matrix, conv1d_apply, conv2d_apply, conv2d_operator_matrix,
                                     conv2d_power_iteration, exact_conv1d_spectral_norm, exact_conv2d_spectral_norm)
from lipnet.bounds.switch import Switch


def dense_norm(weight, size, **kwargs):
    return float(torch.linalg.matrix_norm(conv2d_operator_matrix(weight, size, **kwargs), ord=2))


@pytest.mark.parametrize("kwargs", [
    dict(stride=2, padding=1),  # stride 2: not circulant
    dict(padding=(1, 0)),  # the input's size in height only: not circulant
    dict(stride=(1, 2), padding=1),
])
def test_circular_convolutions_off_the_fast_path_get_the_dense_norm(kwargs):
    """Only stride-1 circular convolutions keeping the size in both dimensions are circulant; the
    others are computed from the dense operator."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    size = (6, 8)
    expected = dense_norm(weight, size, padding_mode="circular", **kwargs)
    assert exact_conv2d_spectral_norm(weight, size, padding_mode="circular", **kwargs) == pytest.approx(
        expected, rel=1e-12, abs=0)


def test_a_circular_padding_wrapping_more_than_once_is_refused():
    """Dilation 8 on a 6x6 input pads 8 > 6 per side: nn.Conv2d refuses it, so does the oracle
    (whose fast path would otherwise return a number)."""
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="wrapping around more than once"):
        exact_conv2d_spectral_norm(weight, (6, 6), padding="same", dilation=8, padding_mode="circular")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
@pytest.mark.parametrize("kernel, dilation, padding, groups", [
    (4, 1, "same", 1), (2, 3, "same", 2), (3, 1, "valid", 1), (3, 2, 2, 2), (3, 1, (1,), 1),
])
def test_conv1d_apply_is_nn_conv1d_and_its_norm_counts_groups(mode, kernel, dilation, padding, groups):
    """conv1d_apply reproduces nn.Conv1d (odd 'same' totals pad one more on the right), and
    exact_conv1d_spectral_norm is the largest singular value of the module's dense matrix."""
    torch.manual_seed(kernel * 10 + dilation)
    conv = nn.Conv1d(4, 2, kernel, dilation=dilation, padding=padding, groups=groups, bias=False,
                     padding_mode=mode).double()
    kw = dict(dilation=dilation, padding=padding, groups=groups, padding_mode=mode)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(conv1d_apply(x, conv.weight.detach(), **kw), conv(x).detach(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        expected = float(torch.linalg.matrix_norm(affine_map_matrix(conv, (4, 9)), ord=2))
    assert exact_conv1d_spectral_norm(conv.weight, 9, **kw) == pytest.approx(expected, rel=1e-12, abs=0)


def test_power_iteration_returns_the_norm_of_a_over_its_last_unit_vector():
    """After one step, ``||A v1||`` with ``v1 = A^T A v0 / ||A^T A v0||`` from the generator's unit
    ``v0``; after none, ``||A v0||``: lower bounds of the norm either way. A zero kernel gives 0."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    matrix = conv2d_operator_matrix(weight, (5, 5), padding=1)
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    v0 = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).flatten()
    v0 = v0 / v0.norm()
    v1 = matrix.T @ (matrix @ v0)
    v1 = v1 / v1.norm()
    for n_iter, v in ((0, v0), (1, v1)):
        estimate = conv2d_power_iteration(weight, (5, 5), n_iter=n_iter, generator=torch.Generator().manual_seed(3),
                                          padding=1)
        assert estimate == pytest.approx(float((matrix @ v).norm()), rel=1e-12) and estimate <= exact
    converged = conv2d_power_iteration(weight, (5, 5), n_iter=300, generator=torch.Generator().manual_seed(3),
                                       padding=1)
    assert exact * (1 - 1e-6) <= converged <= exact * (1 + 1e-12)
    assert conv2d_power_iteration(torch.zeros(3, 2, 3, 3, dtype=torch.float64), (5, 5), padding=1) == 0.0


def test_conv2d_apply_pads_height_and_width_as_nn_conv2d():
    """Reflect padding of a 2x3 kernel ('same': 1 row, 2 columns split 1/1) on a 5x7 input."""
    conv = nn.Conv2d(2, 3, (2, 3), padding=(1, 2), padding_mode="reflect", bias=False).double()
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(conv2d_apply(x, conv.weight.detach(), padding=(1, 2), padding_mode="reflect"),
                               conv(x).detach())


def test_scoped_restores_the_previous_value_when_it_equals_the_one_set():
    """scoped(True) on a switch already on leaves it on, and scoped(False) on one already off
    leaves it off."""
    for value in (True, False):
        switch = Switch(value)
        with switch.scoped(value):
            assert switch.enabled is value
        assert switch.enabled is value
        with switch.scoped(not value):
            assert switch.enabled is (not value)
        assert switch.enabled is value


@pytest.mark.parametrize("kwargs", [dict(padding=1, padding_mode="circular"), dict(padding=1, stride=2)])
def test_a_float32_kernel_gets_the_norm_of_its_exact_float64_value(kwargs):
    """The oracle computes in float64 whatever the kernel's dtype (fast and dense paths alike)."""
    weight = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    assert exact_conv2d_spectral_norm(weight, (6, 6), **kwargs) == exact_conv2d_spectral_norm(weight.double(), (6, 6),
                                                                                            **kwargs)
