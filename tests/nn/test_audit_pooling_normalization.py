"""Audit of pooling and input normalization: certified bounds against exact references.

Average pools are linear: their exact norm is the spectral norm of the dense float64 matrix
built from impulses. Max and L2-norm pooling are not: the spectral norm of the Jacobian at
inputs whose few large entries sit in window overlaps is a lower bound on their constant.
Every bound must be at least these (up to float64 rounding of the reference itself, 1e-12).
"""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound
from lipnet.nn import InputNormalization, L2NormPool2d, ScaledAvgPool2d
from lipnet.nn.pooling import window_multiplicity

ROUNDING = 1e-12


def dense_norm(module, shape, dtype, channels_last):
    """Spectral norm of the linear ``module`` on inputs of ``shape``, from its impulse responses."""
    n = math.prod(shape)
    impulses = torch.eye(n, dtype=dtype).reshape(n, *shape)
    if channels_last and len(shape) == 3:
        impulses = impulses.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        columns = module.to(dtype)(impulses).reshape(n, -1).double()
    return torch.linalg.matrix_norm(columns.T, ord=2).item()


def jacobian_lower_bound(module, shape, rng, dtype, channels_last, trials=6):
    """Largest Jacobian spectral norm over inputs with a few spikes over small noise."""
    module = module.to(dtype)
    best = 0.0
    for _ in range(trials):
        x = 1e-2 * torch.randn(1, *shape, dtype=torch.float64)
        for _ in range(rng.randint(1, 4)):
            x.view(-1)[rng.randrange(x.numel())] = rng.uniform(1, 4)
        x = x.to(dtype)
        if channels_last and len(shape) == 3:
            x = x.contiguous(memory_format=torch.channels_last)
        jac = torch.autograd.functional.jacobian(module, x).reshape(-1, x.numel()).double()
        best = max(best, torch.linalg.matrix_norm(jac, ord=2).item())
    return best


def random_pool(rng):
    """A pooling module accepted by torch on a random input shape (stride < kernel included)."""
    while True:
        kind = rng.choice(["AvgPool2d", "MaxPool2d", "AvgPool1d", "MaxPool1d", "ScaledAvgPool2d", "L2NormPool2d",
                           "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"])
        k, s, d = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        p = rng.randint(0, k // 2)
        ceil, count_pad = rng.random() < 0.5, rng.random() < 0.5
        shape2, shape1 = (rng.randint(1, 2), rng.randint(1, 7), rng.randint(1, 7)), (rng.randint(1, 2), rng.randint(1, 9))
        module, shape = {
            "AvgPool2d": lambda: (nn.AvgPool2d((k, rng.randint(1, 3)), (s, rng.randint(1, 3)), p, ceil, count_pad,
                                               rng.choice([None, 1, 3, -2])), shape2),
            "MaxPool2d": lambda: (nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), shape2),
            "AvgPool1d": lambda: (nn.AvgPool1d(k, s, p, ceil, count_pad), shape1),
            "MaxPool1d": lambda: (nn.MaxPool1d(k, s, p, d, ceil_mode=ceil), shape1),
            "ScaledAvgPool2d": lambda: (ScaledAvgPool2d(k, s, p), shape2),
            "L2NormPool2d": lambda: (L2NormPool2d(k, s, p), shape2),
            "AdaptiveAvgPool2d": lambda: (nn.AdaptiveAvgPool2d((rng.randint(1, 8), rng.randint(1, 8))), shape2),
            "AdaptiveMaxPool2d": lambda: (nn.AdaptiveMaxPool2d((rng.randint(1, 8), rng.randint(1, 8))), shape2),
        }[kind]()
        try:
            module(torch.zeros(1, *shape))
            bound = lipschitz_bound(module, shape)
        except (RuntimeError, ValueError):  # torch refuses the shape, or the bound refuses ceil_mode (tested below)
            continue
        return kind, module, shape, bound


@pytest.mark.parametrize("seed", range(4))
def test_pooling_bounds_at_least_the_exact_or_jacobian_norm(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(60):
        kind, module, shape, bound = random_pool(rng)
        dtype = rng.choice([torch.float32, torch.float64])
        channels_last = rng.random() < 0.5
        if "Avg" in kind:
            true = dense_norm(module, shape, dtype, channels_last)
        else:
            true = jacobian_lower_bound(module, shape, rng, dtype, channels_last)
        tolerance = ROUNDING if dtype == torch.float64 else 1e-6
        assert true <= bound * (1 + tolerance), (module, shape, dtype, channels_last, bound, true)


def test_avg_pool_settings_that_divide_windows_unevenly_are_refused():
    for module in (nn.AvgPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                   nn.AvgPool1d(3, 2, ceil_mode=True), nn.AvgPool1d(3, 2, 1, count_include_pad=False)):
        shape = (1, 7, 7) if isinstance(module, nn.AvgPool2d) else (1, 7)
        with pytest.raises(LipschitzBoundError, match="count_include_pad=True"):
            lipschitz_bound(module, shape)


@pytest.mark.parametrize("module, shape", [(nn.LPPool2d(2, 2), (1, 4, 4)), (nn.LPPool1d(1, 2), (1, 4)),
                                           (nn.MaxPool3d(2), (1, 4, 4, 4)), (nn.AvgPool3d(2), (1, 4, 4, 4))])
def test_pools_without_a_bound_are_refused_by_name(module, shape):
    with pytest.raises(UnknownModuleError, match=type(module).__name__):
        lipschitz_bound(module, shape)


def test_window_multiplicity_takes_any_integer_type():
    # pooling_lipschitz_bound passes numpy integers through pair() as ints; a direct call said
    # "kernel size must be an integer >= 1, got np.int64(3)".
    assert window_multiplicity(np.int64(3), np.int32(1), np.int64(2)) == 3
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        window_multiplicity(2, 1.0)


# ----------------------------------------------------------------------------- InputNormalization


@pytest.mark.parametrize("dtype, std", [(torch.float16, 1 + 2 ** -11 - 2 ** -20), (torch.bfloat16, 1 + 2 ** -8 - 2 ** -20)])
def test_low_precision_inputs_are_divided_by_the_stored_std(dtype, std):
    # Each std rounds down to 1 in the input's dtype: divided in that dtype, the map had gain 1,
    # above the bound 1 / std (0.99951 and 0.99611) taken from the float32 buffer.
    norm = InputNormalization([0.0], [std])
    x = torch.ones(1, 1, 1, 1, dtype=dtype)
    gain = (norm(x) - norm(torch.zeros_like(x))).double().item()
    assert gain <= lipschitz_bound(norm, (1, 1, 1))
    assert norm(x).dtype == dtype


def test_float32_inputs_of_a_float64_module_are_divided_by_the_stored_std():
    # std = 1 + 2^-24 - 2^-40 in float64 rounds to 1 in float32: gain 1 > bound 0.99999994.
    norm = InputNormalization([0.0], [1.0]).double()
    norm.load_state_dict({"mean": torch.zeros(1, dtype=torch.float64),
                          "std": torch.tensor([1 + 2 ** -24 - 2 ** -40], dtype=torch.float64)})
    x = torch.ones(1, 1, 1, 1)
    assert norm(x).double().item() <= lipschitz_bound(norm, (1, 1, 1))
    assert norm(x).dtype == torch.float32


def test_integer_inputs_are_normalized_in_floating_point():
    # mean and std were cast to uint8 (0.5 -> 0, 0.25 -> 0): the output was inf.
    norm = InputNormalization([0.5], [0.25])
    out = norm(torch.full((1, 1, 1, 1), 1, dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.item() == 2.0


def test_a_std_buffer_of_another_length_is_refused():
    # std written as two values for one channel broadcast the channel onto two outputs: the map
    # x -> (x, x) has norm sqrt(2), the bound was 1.
    norm = InputNormalization([0.0], [1.0])
    norm.std = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        norm(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="same length"):
        norm.lipschitz_bound()
    with pytest.raises(ValueError, match="same length"):
        lipschitz_bound(nn.Sequential(norm), (1, 2, 2))


def test_empty_statistics_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        InputNormalization([], [])


@pytest.mark.parametrize("std", [0.0, -0.5, float("nan")])
def test_bad_std_is_refused_everywhere(std):
    with pytest.raises(ValueError, match="positive"):
        InputNormalization([0.0], [std])
    norm = InputNormalization([0.0], [0.5])
    with pytest.raises(ValueError, match="positive"):
        norm.load_state_dict({"mean": torch.zeros(1), "std": torch.tensor([std])})
    assert norm.std.item() == 0.5
    norm.std.fill_(std)
    with pytest.raises(ValueError, match="positive"):
        lipschitz_bound(norm, (1, 2, 2))


@pytest.mark.parametrize("mean", [float("nan"), float("inf")])
def test_non_finite_mean_is_refused_everywhere(mean):
    with pytest.raises(ValueError, match="finite"):
        InputNormalization([mean], [1.0])
    norm = InputNormalization([0.0], [0.5])
    with pytest.raises(ValueError, match="finite"):
        norm.load_state_dict({"mean": torch.tensor([mean]), "std": torch.tensor([0.5])})
    norm.mean.fill_(mean)
    with pytest.raises(ValueError, match="finite"):
        norm.lipschitz_bound()


def test_a_std_that_the_buffer_rounds_to_zero_is_refused_on_load():
    # 1e-50 > 0 in the float64 state_dict, but the float32 buffer holds 0.
    norm = InputNormalization([0.0], [0.5])
    with pytest.raises(ValueError, match="positive"):
        norm.load_state_dict({"mean": torch.zeros(1), "std": torch.tensor([1e-50], dtype=torch.float64)})
    assert norm.std.item() == 0.5


def test_construction_on_the_meta_device():
    with torch.device("meta"):
        norm = InputNormalization([0.5, 0.4], [0.25, 0.2])
        with pytest.raises(ValueError, match="positive"):  # the given numbers are still checked
            InputNormalization([0.5], [0.0])
        with pytest.raises(ValueError, match="finite"):
            InputNormalization([float("nan")], [1.0])
    assert norm.mean.is_meta and norm.std.is_meta
    assert "meta" in repr(norm)
    with pytest.raises(ValueError, match="meta device"):
        norm.lipschitz_bound()
    # Meta tensors as statistics, and a meta state_dict loaded into a meta module.
    other = InputNormalization(torch.zeros(2, device="meta"), torch.ones(2, device="meta"))
    other.load_state_dict(norm.state_dict(), assign=True)
    # Materialized and loaded, the module is checked and bounded as if built on the CPU.
    norm.to_empty(device="cpu")
    with pytest.raises(ValueError, match="positive"):
        norm.load_state_dict({"mean": torch.zeros(2), "std": torch.tensor([0.5, 0.0])})
    norm.load_state_dict({"mean": torch.zeros(2), "std": torch.tensor([0.5, 0.25])})
    assert norm.lipschitz_bound() == math.nextafter(4.0, math.inf)
    assert repr(norm) == "InputNormalization(mean=[0.0, 0.0], std=[0.5, 0.25])"


def test_dtype_conversion_keeps_a_sound_bound():
    norm = InputNormalization([0.5], [0.1]).to(torch.float16)  # 0.1 rounds down in float16
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    z = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    ratio = ((norm(x) - norm(z)).flatten(1).norm(dim=1) / (x - z).flatten(1).norm(dim=1)).max().item()
    assert ratio <= norm.lipschitz_bound() == lipschitz_bound(norm, (1, 3, 3))
    assert norm.lipschitz_bound() > 1 / 0.1  # the float16 std's bound, not the float32 one
