"""Soundness of conv1d_spectral_norm against the exact norm of the operator nn.Conv1d applies.

The exact norm comes from the dense operator built from impulse responses of F.conv1d in
float64 (exact_conv1d_spectral_norm), a code path independent of the 2-D embedding the
bound reuses.
"""

import math
import random

import pytest
import torch

from lipnet.bounds import conv1d_spectral_norm, conv2d_spectral_norm, exact_conv1d_spectral_norm

MODES = ["zeros", "circular", "reflect", "replicate"]
KINDS = ["gaussian", "constant", "alternating", "off_grid", "rank_one", "last_tap"]


def kernel_1d(kind, c_out, c_in_g, k, gen):
    shape = (c_out, c_in_g, k)
    if kind == "gaussian":
        return torch.randn(shape, dtype=torch.float64, generator=gen)
    if kind == "constant":  # all energy at frequency 0
        return torch.ones(shape, dtype=torch.float64)
    if kind == "alternating":  # energy at the Nyquist frequency
        return torch.ones(shape, dtype=torch.float64) * (-1.0) ** torch.arange(k, dtype=torch.float64)
    if kind == "off_grid":  # a cosine whose peak falls between FFT grid points
        w0 = math.pi / (2.37 + torch.rand(1, generator=gen).item())
        return torch.cos(w0 * torch.arange(k, dtype=torch.float64)) * torch.randn(c_out, c_in_g, 1, dtype=torch.float64,
                                                                                  generator=gen)
    if kind == "rank_one":
        u = torch.randn(c_out, 1, 1, dtype=torch.float64, generator=gen)
        v = torch.randn(1, c_in_g, 1, dtype=torch.float64, generator=gen)
        return u * v * torch.randn(1, 1, k, dtype=torch.float64, generator=gen)
    if kind == "last_tap":  # reads mostly padding at the border
        kernel = torch.zeros(shape, dtype=torch.float64)
        kernel[..., -1] = torch.randn(c_out, c_in_g, dtype=torch.float64, generator=gen)
        return kernel
    raise ValueError(kind)


def random_case(rng):
    groups = rng.choice([1, 1, 2, 3])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    k, stride, dilation = rng.randint(1, 6), rng.choice([1, 2, 3]), rng.choice([1, 1, 2, 3])
    n = rng.randint(1, 24)
    padding = rng.choice(["same", "valid"]) if stride == 1 and rng.random() < 0.25 else rng.randint(0, 5)
    if rng.random() < 0.2 and not isinstance(padding, str):
        padding = (padding,)  # nn.Conv1d also takes 1-tuples
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=rng.choice(MODES))
    return c_in, c_out, k, n, kw


def accepted_by_pytorch(c_in, c_out, k, n, kw):
    try:
        torch.nn.Conv1d(c_in, c_out, k, bias=False, **kw)(torch.zeros(1, c_in, n))
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("seed", range(20))
def test_sound_on_random_and_adversarial_kernels(seed):
    """bound >= exact norm for every geometry nn.Conv1d accepts (12 cases per seed); what it
    rejects, the bound rejects too."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    while checked < 12:
        c_in, c_out, k, n, kw = random_case(rng)
        if not accepted_by_pytorch(c_in, c_out, k, n, kw):
            with pytest.raises(ValueError):
                conv1d_spectral_norm(torch.randn(c_out, c_in // kw["groups"], k), n, **kw)
            continue
        weight = kernel_1d(KINDS[checked % len(KINDS)], c_out, c_in // kw["groups"], k, gen)
        exact = exact_conv1d_spectral_norm(weight, n, **kw)
        for n_iter, screen, cands in [(10, 5, 8), (3, 1, 1), (0, 0, 1)]:
            bound = conv1d_spectral_norm(weight, n, n_iter=n_iter, screen_iter=screen, n_candidates=cands, **kw).item()
            assert bound >= exact * (1 - 1e-12), (c_in, c_out, k, n, kw, n_iter, bound, exact)
        assert conv1d_spectral_norm(weight.float(), n, **kw).item() >= exact * (1 - 1e-5)
        checked += 1


@pytest.mark.parametrize("n", [6, 11, 16])
@pytest.mark.parametrize("k", [3, 4])
def test_circular_same_is_tight(n, k):
    weight = torch.randn(5, 3, k, dtype=torch.float64, generator=torch.Generator().manual_seed(n + k))
    kw = dict(padding="same", padding_mode="circular")
    bound = conv1d_spectral_norm(weight, n, n_iter=14, screen_iter=14, **kw).item()
    exact = exact_conv1d_spectral_norm(weight, n, **kw)
    assert exact * (1 - 1e-12) <= bound <= exact * (1 + 1e-9)  # equal up to float64 rounding


def test_zero_padding_is_close_to_exact_on_long_inputs():
    weight = torch.randn(4, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bound = conv1d_spectral_norm(weight, 64, padding=2, n_iter=14, screen_iter=14).item()
    exact = exact_conv1d_spectral_norm(weight, 64, padding=2)
    assert exact <= bound <= exact * 1.01


def test_equals_the_2d_bound_of_the_kernel_on_inputs_of_height_1():
    weight = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1))
    bound = conv1d_spectral_norm(weight, 20, stride=2, padding=3, dilation=2, groups=1)
    flat = conv2d_spectral_norm(weight[:, :, None], (1, 20), stride=(1, 2), padding=(0, 3), dilation=(1, 2))
    assert float(bound) == float(flat)


def test_stacked_kernels_are_bounded_as_if_alone():
    weights = torch.randn(3, 4, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    stacked = conv1d_spectral_norm(weights, 12, padding=1)
    alone = torch.stack([conv1d_spectral_norm(w, 12, padding=1) for w in weights])
    torch.testing.assert_close(stacked, alone)


def test_gradient_matches_finite_differences():
    weight = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    torch.autograd.gradcheck(lambda w: conv1d_spectral_norm(w, 9, padding=1, n_iter=14, screen_iter=14), (weight,))


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=torch.randn(2, 3)), "shape"),
    (dict(weight=torch.randn(1, 2, 2, 3, 3)), "shape"),
    (dict(input_size=(4, 4)), "length"),
    (dict(stride=(1, 2)), "1-tuple"),
    (dict(padding=(1, 1)), "1-tuple"),
    (dict(dilation=(2, 2)), "1-tuple"),
    (dict(input_size=True), r"input size \(its length n\) must be an int .*got True$"),
    (dict(input_size=(True,)), "got True$"),
    (dict(input_size=8.5), "got 8.5$"),
    (dict(stride=2.5), "stride must be an int .*got 2.5$"),
    (dict(dilation=(False,)), "dilation must be an int .*got False$"),
])
def test_clear_errors(kwargs, message):
    args = dict(weight=torch.randn(2, 2, 3), input_size=8) | kwargs
    with pytest.raises(ValueError, match=message):
        conv1d_spectral_norm(args.pop("weight"), args.pop("input_size"), **args)
