"""Pooling layers: the proven bounds against exact operator norms and Jacobians."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet.nn import GlobalL2NormPool2d, GlobalScaledAvgPool2d, L2NormPool2d, ScaledAvgPool2d
from lipnet.nn.pooling import (
    adaptive_pooling_lipschitz_bound,
    adaptive_windows,
    pooling_lipschitz_bound,
    window_multiplicity,
)

# (kernel_size, stride, padding)
CONFIGS = [(2, None, 0), (3, None, 1), ((2, 3), None, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1), ((3, 2), (1, 2), 0)]


def jacobian_norm(fn, x):
    """Exact spectral norm of the Jacobian of ``fn`` at ``x`` (float64, small inputs)."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item()


def brute_force_multiplicity(n, kernel, stride, dilation, pad):
    """Count, for every input sample, the windows PyTorch's max pooling reads it in."""
    out = (n + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    counts = [0] * n
    for o in range(out):
        for a in range(kernel):
            q = o * stride + dilation * a - pad
            if 0 <= q < n:
                counts[q] += 1
    return max(counts)


def test_window_multiplicity_is_the_brute_force_maximum():
    rng = random.Random(0)
    for _ in range(500):
        kernel, stride, dilation = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 3)
        pad = rng.randint(0, kernel // 2)
        bound = window_multiplicity(kernel, stride, dilation)
        for n in (dilation * (kernel - 1) + 1, 17, 40):
            if n + 2 * pad >= dilation * (kernel - 1) + 1:
                assert brute_force_multiplicity(n, kernel, stride, dilation, pad) <= bound
        # Attained on a long enough input.
        assert brute_force_multiplicity(60, kernel, stride, dilation, pad) == bound


def test_window_multiplicity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        window_multiplicity(2, 0)


@pytest.mark.parametrize("kernel_size, stride, padding", CONFIGS)
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_scaled_avg_pool_exact_norm_at_most_bound(kernel_size, stride, padding, size):
    pool = ScaledAvgPool2d(kernel_size, stride, padding)
    x = torch.zeros(1, 2, *size, dtype=torch.float64)
    exact = jacobian_norm(pool, x)  # a linear map: the Jacobian is the operator
    bound = pool.lipschitz_bound(size)
    assert exact <= bound
    if pool.stride == pool.kernel_size or all(s >= k for s, k in zip(pool.stride, pool.kernel_size)):
        assert bound == pytest.approx(1.0, abs=1e-15)
        assert exact == pytest.approx(1.0, abs=2.0 ** -23)  # tight (a full window) up to the scale's rounding


@pytest.mark.parametrize("kernel_size", [(1, 2), (2, 1), (2, 3), (1, 5), (3, 5), (2, 4), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scaled_avg_pool_applies_one_scale_at_most_sqrt_of_the_area_in_every_dtype(kernel_size, dtype):
    """A full window of ones comes out as the applied scale ``s`` itself; ``s^2 <= k_h k_w``
    exactly (``math.sqrt(2)`` is above ``sqrt(2)`` in float64, ``sqrt(6)`` once in float32)."""
    from fractions import Fraction

    area = math.prod(kernel_size)
    scale = ScaledAvgPool2d(kernel_size)(torch.ones(1, 1, *kernel_size, dtype=dtype)).item()
    reference = ScaledAvgPool2d(kernel_size)(torch.ones(1, 1, *kernel_size, dtype=torch.float64)).item()
    if dtype != torch.bfloat16:  # bf16 rounds the product to 8 bits (rounding, left to certification)
        assert scale == reference
    assert Fraction(reference) ** 2 <= area
    assert Fraction(reference) ** 2 >= area * (1 - 2.0 ** -22)


def test_overlapping_scaled_avg_pool_bound_is_nearly_attained():
    pool = ScaledAvgPool2d(2, 1)  # m = 4, bound 2
    x = torch.ones(1, 1, 40, 40, dtype=torch.float64)
    gain = (pool(x).norm() / x.norm()).item()
    assert 0.95 * pool.lipschitz_bound() <= gain <= pool.lipschitz_bound()


@pytest.mark.parametrize("kernel_size, stride, padding", CONFIGS)
def test_l2_norm_pool_jacobian_and_pairs_within_bound(kernel_size, stride, padding):
    pool = L2NormPool2d(kernel_size, stride, padding)
    bound = pool.lipschitz_bound()
    for _ in range(5):
        x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
        assert jacobian_norm(pool, x) <= bound * (1 + 1e-12)
    # The constant image attains sqrt(m) on the interior windows.
    assert jacobian_norm(pool, torch.ones(1, 1, 7, 6, dtype=torch.float64)) <= bound * (1 + 1e-12)
    a, b = torch.randn(500, 2, 7, 6, dtype=torch.float64), torch.randn(500, 2, 7, 6, dtype=torch.float64)
    b = a + 1e-3 * b * torch.rand(500, 1, 1, 1, dtype=torch.float64)
    ratio = (pool(a) - pool(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max().item() <= bound * (1 + 1e-9)


def test_l2_norm_pool_values_and_zero_gradient():
    pool = L2NormPool2d(2)
    x = torch.tensor([[[[3.0, 4.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]], requires_grad=True)
    out = pool(x)
    assert out.shape == (1, 1, 1, 2)
    torch.testing.assert_close(out.detach(), torch.tensor([[[[5.0, 1.0]]]]))
    zero = torch.zeros(1, 1, 4, 4, requires_grad=True)
    pool(zero).sum().backward()
    assert torch.isfinite(zero.grad).all() and zero.grad.abs().max() == 0


def test_l2_norm_pool_under_autocast_is_finite():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = L2NormPool2d(2)(x)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("kernel_size, stride, padding, dilation", [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2),
                                                                     (2, 1, 0, 1), ((3, 2), (2, 1), (1, 0), 1)])
def test_max_pooling_obeys_the_same_bound(kernel_size, stride, padding, dilation):
    bound = pooling_lipschitz_bound(kernel_size, stride, dilation)
    pool = nn.MaxPool2d(kernel_size, stride, padding, dilation)
    for _ in range(5):
        x = torch.randn(1, 2, 8, 7, dtype=torch.float64)
        assert jacobian_norm(pool, x) <= bound * (1 + 1e-12)
    # The worst case: a spike that is the maximum of every window holding it, at a position
    # (odd, away from the borders) held by m windows in all these configurations. Its Jacobian
    # column has m ones, so the bound sqrt(m) is attained.
    x = -torch.rand(1, 1, 24, 24, dtype=torch.float64)
    x[0, 0, 11, 11] = 1.0
    assert jacobian_norm(pool, x) == pytest.approx(bound, rel=1e-12)


def test_adaptive_windows_match_pytorch():
    for n in range(1, 12):
        for out in range(1, 12):
            x = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
            sums = F.adaptive_avg_pool1d(x, out) * torch.tensor([e - s for s, e in adaptive_windows(n, out)])
            expected = [sum(range(s, e)) for s, e in adaptive_windows(n, out)]
            torch.testing.assert_close(sums.flatten(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("input_size, output_size", [((6, 6), 1), ((7, 5), (3, 2)), ((5, 5), (4, 4)), ((4, 6), (6, 6))])
def test_adaptive_pooling_bounds(input_size, output_size):
    avg = nn.AdaptiveAvgPool2d(output_size)
    zero = torch.zeros(1, 1, *input_size, dtype=torch.float64)
    exact = jacobian_norm(avg, zero)
    bound = adaptive_pooling_lipschitz_bound(input_size, output_size, average=True)
    assert exact <= bound
    if output_size == 1:
        assert bound == pytest.approx(1 / math.sqrt(math.prod(input_size)), rel=1e-15)
    mx = nn.AdaptiveMaxPool2d(output_size)
    bound = adaptive_pooling_lipschitz_bound(input_size, output_size, average=False)
    for _ in range(5):
        assert jacobian_norm(mx, torch.randn(1, 1, *input_size, dtype=torch.float64)) <= bound * (1 + 1e-12)


def test_global_pools():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(GlobalL2NormPool2d()(x), x.flatten(2).norm(dim=2)[..., None, None])
    torch.testing.assert_close(GlobalScaledAvgPool2d()(x), x.sum(dim=(2, 3), keepdim=True) / math.sqrt(30))
    for pool in (GlobalL2NormPool2d(), GlobalScaledAvgPool2d()):
        assert 1.0 <= pool.lipschitz_bound((5, 6)) <= 1 + 2 ** -52  # the scaled one allows for fl(sqrt(h w))
        assert jacobian_norm(pool, torch.randn(1, 2, 5, 6, dtype=torch.float64)) <= 1 + 1e-12
    assert jacobian_norm(GlobalScaledAvgPool2d(), torch.zeros(1, 1, 5, 6, dtype=torch.float64)) == pytest.approx(1.0)


def test_bad_padding_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="half the kernel size"):
        L2NormPool2d(2, padding=2)
    with pytest.raises(ValueError, match="stride"):
        ScaledAvgPool2d(2, stride=0)


@pytest.mark.parametrize("make, name", [
    (lambda: ScaledAvgPool2d(True), "kernel_size"),
    (lambda: L2NormPool2d(2, stride=(2, True)), "stride"),
])
def test_a_bool_setting_is_refused_by_name(make, name):
    """torch's pooling refuses bools: so do lipnet's, naming the setting."""
    with pytest.raises(ValueError, match=f"{name} must be an int or a pair of ints \\(not bools\\)"):
        make()
