"""Adversarial soundness audit of the certified bounds of eval-mode BatchNorm, of maps that copy
entries (padding, nearest upsampling) and of GramConvTranspose2d.

Each bound is compared with an exact reference: the largest ``|gamma| / sqrt(var + eps)`` in
60-digit decimal arithmetic (under either eps a float32 module may add), the rounding error of
the float64 forward in decimal arithmetic, and the norm of the dense matrix built from impulse
responses in float64. Seeded, randomized and fast.
"""

import decimal
import math
import random

import pytest
import torch
from torch import nn

from lipnet.bounds import affine_map_matrix
from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.lipschitz import module_lipschitz_bounds
from lipnet.certify.precision import exact_kernels, forward_with_error_bound
from lipnet.nn import GramConvTranspose2d

CONTEXT = decimal.Context(prec=60)
D = decimal.Decimal


def dense_matrix(module: nn.Module, shape, dtype=torch.float64) -> torch.Tensor:
    """The matrix of an affine map applied in ``dtype``, in float64 (transposed: a row per basis
    vector)."""
    with torch.no_grad():
        return affine_map_matrix(module, shape, dtype).T


def dense_norm(module: nn.Module, shape, dtype=torch.float64) -> float:
    a = dense_matrix(module, shape, dtype)
    if a.numel() == 0:
        return 0.0
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


# ----------------------------------------------------------------------------- BatchNorm


def magnitude(rng) -> float:
    if rng.random() < 0.2:
        return rng.choice([0.0, -0.0, 1.0, -1.0])
    sign = rng.choice([-1.0, 1.0]) if rng.random() < 0.3 else 1.0
    return sign * rng.random() * 10.0 ** rng.choice([-320, -310, -45, -40, -38, -20, -5, 0, 5, 20, 38, 300])


def random_batch_norm(rng):
    channels = rng.randint(1, 4)
    cls, shape = rng.choice([(nn.BatchNorm1d, (channels,)), (nn.BatchNorm1d, (channels, 3)),
                             (nn.BatchNorm2d, (channels, 2, 1)), (nn.BatchNorm3d, (channels, 1, 1, 2)),
                             (nn.SyncBatchNorm, (channels, 2))])
    eps = rng.choice([1e-5, 1e-3, 0.0, 1e-12, 1e-50, 0.1, 3e-5])
    bn = cls(channels, eps=eps, affine=rng.random() < 0.7, momentum=rng.choice([None, 0.1]))
    bn = bn.to(rng.choice([torch.float32, torch.float64]))
    with torch.no_grad():
        for t in (bn.running_mean, bn.running_var, *((bn.weight, bn.bias) if bn.affine else ())):
            t.copy_(torch.tensor([magnitude(rng) for _ in range(channels)], dtype=torch.float64))
        if rng.random() < 0.5:
            bn.running_var.abs_()
        if rng.random() < 0.3:  # var + eps at or just above 0
            bn.running_var.copy_(torch.tensor([rng.choice([-eps, -eps * (1 - 1e-7), 1e-45, 5e-324, 0.0])
                                               for _ in range(channels)]))
    return bn, shape


def exact_scale(bn) -> D | None:
    """``max_c |gamma_c| / sqrt(var_c + eps)`` in decimal arithmetic, the largest over the eps
    as stored and its float32 rounding; ``None`` where a channel's ``var + eps <= 0``."""
    gammas = bn.weight.detach().double().tolist() if bn.affine else [1.0] * bn.num_features
    variances = bn.running_var.double().tolist()
    largest = D(0)
    for eps in {bn.eps, float(torch.tensor(bn.eps, dtype=torch.float32))}:
        for gamma, var in zip(gammas, variances):
            denominator = CONTEXT.add(D(var), D(eps))
            if denominator <= 0:
                return None
            largest = max(largest, CONTEXT.divide(abs(D(gamma)), CONTEXT.sqrt(denominator)))
    return largest


@pytest.mark.parametrize("seed", range(3))
def test_batch_norm_bound_is_never_below_the_exact_scale(seed):
    rng = random.Random(seed)
    accepted = 0
    for _ in range(400):
        bn, shape = random_batch_norm(rng)
        finite = all(bool(torch.isfinite(t).all()) for t in (bn.running_mean, bn.running_var, *bn.parameters()))
        exact = exact_scale(bn) if finite else None
        try:
            bound = lipschitz_bound(bn, shape)
        except LipschitzBoundError:
            continue
        assert exact is not None, (bn, bn.running_var)  # NaN, inf or var + eps <= 0 is refused
        assert D(bound) >= exact, (bn, bn.running_var, bn.weight, bound, exact)
        accepted += 1
    assert accepted >= 100


def test_batch_norm_bound_is_tight_and_the_dense_norm_agrees():
    rng = random.Random(11)
    for _ in range(60):
        channels = rng.randint(1, 4)
        bn = nn.BatchNorm2d(channels, eps=rng.choice([1e-5, 0.0, 0.5]), dtype=torch.float64).eval()
        with torch.no_grad():
            bn.running_mean.zero_()  # the shift does not change the norm, and would round the differences
            bn.running_var.copy_(torch.tensor([10.0 ** rng.uniform(-9, 9) for _ in range(channels)]))
            bn.weight.copy_(torch.tensor([rng.choice([-1, 1]) * 10.0 ** rng.uniform(-3, 3) for _ in range(channels)]))
        shape = (channels, rng.randint(1, 3), rng.randint(1, 3))
        bound, exact = lipschitz_bound(bn, shape), dense_norm(bn, shape)
        # Tight up to eps rounded to float32 (1e-5 (1 - 2.5e-8), which float32 modules add).
        assert exact * (1 - 1e-12) <= bound <= exact * (1 + 1e-7) + 1e-300, (bound, exact)


def test_batch_norm_rounding_of_the_certification_forward_is_bounded():
    """Means, biases that cancel the shift, tiny variances, inputs near the mean: the float64
    forward's distance to the exact outputs, in 60-digit arithmetic, never exceeds its bound."""
    rng = random.Random(5)
    torch.manual_seed(5)
    for _ in range(60):
        channels = rng.randint(1, 3)
        cls, shape = rng.choice([(nn.BatchNorm1d, (channels,)), (nn.BatchNorm1d, (channels, 2)),
                                 (nn.BatchNorm2d, (channels, 2, 2))])
        bn = cls(channels, eps=rng.choice([1e-5, 0.0, 1e-300])).double().eval()
        with torch.no_grad():
            for c in range(channels):
                bn.running_mean[c] = rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-5, 12)
                bn.running_var[c] = 10.0 ** rng.uniform(-12, 6)
                bn.weight[c] = rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-6, 6)
                scale = float(bn.weight[c]) / math.sqrt(float(bn.running_var[c]) + bn.eps)
                bn.bias[c] = float(bn.running_mean[c]) * scale * (1 + rng.choice([0.0, 1e-15, 1e-10, 1.0]))
        x = torch.randn(4, *shape, dtype=torch.float64) * 10.0 ** rng.uniform(-8, 4)
        if rng.random() < 0.5:
            x = x + bn.running_mean.view(1, channels, *([1] * (len(shape) - 1)))
        _, bounds = module_lipschitz_bounds(bn, shape)
        with exact_kernels(), torch.no_grad():
            y, err = forward_with_error_bound(bn, x, bounds)
        stats = [[D(float(t[c])) for t in (bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach())]
                 for c in range(channels)]
        for xi, yi, bound in zip(x.reshape(len(x), channels, -1), y.reshape(len(y), channels, -1), err):
            squared = D(0)
            for c, (mean, var, gamma, beta) in enumerate(stats):
                scale = CONTEXT.divide(gamma, CONTEXT.sqrt(CONTEXT.add(var, D(bn.eps))))
                for value, computed in zip(xi[c].tolist(), yi[c].tolist()):
                    exact = CONTEXT.add(CONTEXT.multiply(CONTEXT.subtract(D(value), mean), scale), beta)
                    squared += CONTEXT.subtract(D(computed), exact) ** 2
            assert float(CONTEXT.sqrt(squared)) <= float(bound)


@pytest.mark.parametrize(("module", "expected"), [
    (nn.BatchNorm1d(3, track_running_stats=False), "nn.BatchNorm1d"),
    (nn.BatchNorm2d(3, track_running_stats=False), "nn.BatchNorm2d"),
    (nn.BatchNorm3d(3, track_running_stats=False), "nn.BatchNorm3d"),
    (nn.SyncBatchNorm(3, track_running_stats=False), "nn.SyncBatchNorm"),
    (type("MyNorm", (nn.BatchNorm3d,), {})(3, track_running_stats=False), "nn.BatchNorm3d"),
])
def test_batch_statistics_are_refused_with_a_replacement_that_matches_the_module(module, expected):
    """lipnet.convert's replace matches a type and its subclasses: the suggested key must be one
    that the refused module is an instance of."""
    with pytest.raises(LipschitzBoundError, match="track_running_stats=False") as info:
        lipschitz_bound(module, (3, 2, 2, 2) if "3d" in expected else (3, 2))
    assert f"replace={{{expected}: lambda m: nn.Identity()}}" in str(info.value)
    assert isinstance(module, eval(expected, {"nn": nn}))


# ----------------------------------------------------------------------------- copy maps


def random_copy_map(rng):
    dims = rng.choice([1, 2, 3])
    shape = tuple(rng.randint(1, 5) for _ in range(dims + rng.choice([1, 1, 2])))
    pads = tuple(rng.randint(-2, 4) for _ in range(2 * dims))
    kind = rng.choice(["reflect", "replicate", "circular", "zero", "constant", "nearest", "nearest-exact"])
    if kind in ("nearest", "nearest-exact"):
        spatial = max(len(shape) - 1, 1)
        if rng.random() < 0.5:
            return nn.Upsample(scale_factor=rng.choice([0.3, 0.5, 0.7, 1.0, 1.5, 1.7, 2, 2.5, 3, 1 / 3]), mode=kind), shape
        return nn.Upsample(size=tuple(rng.randint(1, 9) for _ in range(spatial)), mode=kind), shape
    types = {"reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
             "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
             "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
             "zero": (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d),
             "constant": (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)}[kind]
    if kind == "constant":
        return types[dims - 1](pads, rng.choice([0.0, 3.5, -1e300])), shape
    return types[dims - 1](pads), shape


def test_copy_map_bounds_are_never_below_the_dense_norm_and_per_example():
    rng = random.Random(3)
    accepted = 0
    for _ in range(700):
        module, shape = random_copy_map(rng)
        try:
            bound = lipschitz_bound(module, shape)
        except (LipschitzBoundError, RuntimeError, NotImplementedError, ValueError):
            continue  # refused, or torch refuses the shape
        exact = dense_norm(module, shape)
        assert bound >= exact * (1 - 1e-14), (module, shape, bound, exact)
        if not isinstance(module, nn.modules.padding._ConstantPadNd):  # 1 also when it crops every input entry
            assert bound <= exact * (1 + 1e-12), (module, shape, bound, exact)
        if not isinstance(module, nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d) or module.value == 0:
            # The same copies in float32 (which holds 0 and 1 exactly), whose kernels may index otherwise.
            assert bound >= dense_norm(module, shape, torch.float32) * (1 - 1e-14), (module, shape, bound)
        # An example's output depends on that example alone (no padding of the batch dimension).
        x = torch.randn(3, *shape, dtype=torch.float64)
        others = torch.cat((x[:1], torch.randn(2, *shape, dtype=torch.float64)))
        with torch.no_grad():
            assert torch.equal(module(x)[0], module(others)[0]) and torch.equal(module(x)[0], module(x[:1])[0])
        accepted += 1
    assert accepted >= 250


def test_nearest_upsampling_bound_covers_the_index_map_of_every_dtype():
    """torch's CPU kernels compute the source index of nearest upsampling in double arithmetic for
    float64 inputs and in float arithmetic for the others (its CUDA kernels in float for every
    dtype): 2 samples upsampled to 82 copy the first 41 times in float64 on the CPU, 42 times in
    float32. The bound must cover the map that the module applies in any dtype."""
    rng = random.Random(23)
    cases = [(nn.Upsample(size=82), (1, 2)), (nn.Upsample(size=94), (3, 2)), (nn.Upsample(size=(58, 82)), (1, 35, 2))]
    while len(cases) < 200:
        dims = rng.choice([1, 2])
        shape = (1, *(rng.randint(1, 40 if dims == 1 else 9) for _ in range(dims)))
        size = tuple(rng.randint(1, 400 if dims == 1 else 40) for _ in range(dims))
        cases.append((nn.Upsample(size=size, mode=rng.choice(["nearest", "nearest-exact"])), shape))
    for module, shape in cases:
        bound = lipschitz_bound(module, shape)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            assert bound >= dense_norm(module, shape, dtype) * (1 - 1e-14), (module, shape, dtype, bound)


# ----------------------------------------------------------------------------- GramConvTranspose2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_conv_transpose_certified_bound_is_never_below_the_dense_norm(dtype):
    """Random geometries with output_padding up to its maximum (the dilation - 1 where it exceeds
    the stride), inputs smaller than the kernel, strides above it, groups, large weights."""
    rng = random.Random(17)
    torch.manual_seed(17)
    checked = 0
    while checked < 30:
        groups = rng.choice([1, 1, 2])
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 3)
        k = (rng.randint(1, 5), rng.randint(1, 5))
        stride, dilation = (rng.randint(1, 4), rng.randint(1, 3)), (rng.choice([1, 2, 3]), rng.choice([1, 2]))
        output_padding = tuple(rng.choice([0, max(s, d) - 1]) for s, d in zip(stride, dilation))
        padding, size = (rng.randint(0, 4), rng.randint(0, 4)), (rng.randint(1, 5), rng.randint(1, 5))
        layer = GramConvTranspose2d(c_in, c_out, k, stride=stride, padding=padding, output_padding=output_padding,
                                    dilation=dilation, groups=groups, dtype=dtype)
        try:
            torch.nn.functional.conv_transpose2d(torch.zeros(1, c_in, *size), layer.weight.float().detach(),
                                                 stride=stride, padding=padding, output_padding=output_padding,
                                                 dilation=dilation, groups=groups)
        except RuntimeError:
            continue
        with torch.no_grad():
            layer.weight.mul_(rng.choice([1e-3, 1.0, 1e3]))
        layer.eval()
        bound = lipschitz_bound(layer, (c_in, *size))
        weight = layer.normalized_weight(size).detach().double()
        layer64 = torch.nn.ConvTranspose2d(c_in, c_out, k, stride=stride, padding=padding,
                                           output_padding=output_padding, dilation=dilation, groups=groups,
                                           bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer64.weight.copy_(weight)
        exact = dense_norm(layer64, (c_in, *size))
        assert exact <= bound <= 1 + 1e-5, (k, size, stride, padding, output_padding, dilation, groups, exact, bound)
        checked += 1
