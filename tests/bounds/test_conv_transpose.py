"""Soundness of conv_transpose2d_spectral_norm against the exact norm of the operator
nn.ConvTranspose2d applies.

The exact norm comes from the dense operator built from impulse responses of
F.conv_transpose2d in float64 (exact_conv_transpose2d_spectral_norm), not from the adjoint
relation the bound relies on.
"""

import random

import pytest
import torch

from lipnet.bounds import (
    conv2d_spectral_norm,
    conv_transpose2d_output_size,
    conv_transpose2d_spectral_norm,
    exact_conv2d_spectral_norm,
    exact_conv_transpose2d_spectral_norm,
)

KINDS = ["gaussian", "constant", "alternating", "rank_one", "corner_tap"]


def kernel(kind, c_in, c_out_g, k, gen):
    shape = (c_in, c_out_g, *k)
    if kind == "gaussian":
        return torch.randn(shape, dtype=torch.float64, generator=gen)
    if kind == "constant":  # all energy at frequency 0
        return torch.ones(shape, dtype=torch.float64)
    if kind == "alternating":  # energy at the Nyquist frequencies
        signs = (-1.0) ** torch.arange(k[0], dtype=torch.float64)[:, None] * (-1.0) ** torch.arange(k[1])
        return torch.ones(shape, dtype=torch.float64) * signs
    if kind == "rank_one":
        u = torch.randn(c_in, 1, 1, 1, dtype=torch.float64, generator=gen)
        v = torch.randn(1, c_out_g, 1, 1, dtype=torch.float64, generator=gen)
        return u * v * torch.randn(1, 1, *k, dtype=torch.float64, generator=gen)
    if kind == "corner_tap":  # one tap, which lands on the cropped border for large padding
        weight = torch.zeros(shape, dtype=torch.float64)
        weight[..., -1, -1] = torch.randn(c_in, c_out_g, dtype=torch.float64, generator=gen)
        return weight
    raise ValueError(kind)


def random_case(rng):
    groups = rng.choice([1, 1, 2])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    k = (rng.randint(1, 5), rng.randint(1, 5))
    stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2]))
    output_padding = tuple(rng.randrange(max(s, d)) for s, d in zip(stride, dilation))
    padding = (rng.randint(0, 4), rng.randint(0, 4))
    n = (rng.randint(1, 6), rng.randint(1, 6))
    return c_in, c_out, k, n, dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                                   groups=groups)


def accepted_by_pytorch(c_in, c_out, k, n, kw):
    """Whether ``nn.ConvTranspose2d`` accepts the settings and input size (with a non-empty output)."""
    try:
        return torch.nn.ConvTranspose2d(c_in, c_out, k, bias=False, **kw)(torch.zeros(1, c_in, *n)).numel() > 0
    except (RuntimeError, ValueError):
        return False


def test_the_output_size_is_pytorchs():
    """... where PyTorch's output is not empty; an empty one (torch returns a tensor of size 0)
    is refused, as are the settings PyTorch refuses."""
    rng = random.Random(0)
    checked = 0
    while checked < 200:
        c_in, c_out, k, n, kw = random_case(rng)
        del kw["groups"]
        if not accepted_by_pytorch(1, 1, k, n, kw):
            with pytest.raises(ValueError):
                conv_transpose2d_output_size(n, k, **kw)
            continue
        out = torch.nn.ConvTranspose2d(1, 1, k, bias=False, **kw)(torch.zeros(1, 1, *n))
        assert conv_transpose2d_output_size(n, k, **kw) == tuple(out.shape[-2:])
        checked += 1


@pytest.mark.parametrize("seed", range(12))
def test_the_bound_is_at_least_the_exact_norm(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    tested = 0
    while tested < 15:
        c_in, c_out, k, n, kw = random_case(rng)
        if not accepted_by_pytorch(c_in, c_out, k, n, kw):
            continue
        weight = kernel(rng.choice(KINDS), c_in, c_out // kw["groups"], k, gen)
        exact = exact_conv_transpose2d_spectral_norm(weight, n, **kw)
        bound = float(conv_transpose2d_spectral_norm(weight, n, n_iter=12, screen_iter=12, **kw))
        assert bound >= exact * (1 - 1e-12), (kw, n, k, exact, bound)
        # and in float32, at its training settings
        bound32 = float(conv_transpose2d_spectral_norm(weight.float(), n, **kw))
        assert bound32 >= exact * (1 - 1e-5), (kw, n, k, exact, bound32)
        tested += 1


@pytest.mark.parametrize("seed", range(4))
def test_the_norm_is_the_adjoint_convolutions_without_output_cropping(seed):
    """With ``output_padding < stride`` the transposed convolution is exactly the adjoint of the
    convolution on its output size: equal exact norms, and the bound is that convolution's."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    tested = 0
    while tested < 10:
        c_in, c_out, k, n, kw = random_case(rng)
        kw["output_padding"] = tuple(rng.randrange(s) for s in kw["stride"])
        if not accepted_by_pytorch(c_in, c_out, k, n, kw):
            continue
        weight = kernel("gaussian", c_in, c_out // kw["groups"], k, gen)
        size = conv_transpose2d_output_size(n, k, stride=kw["stride"], padding=kw["padding"],
                                            output_padding=kw["output_padding"], dilation=kw["dilation"])
        conv = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"], groups=kw["groups"])
        assert exact_conv_transpose2d_spectral_norm(weight, n, **kw) == pytest.approx(
            exact_conv2d_spectral_norm(weight, size, **conv), rel=1e-10)
        assert float(conv_transpose2d_spectral_norm(weight, n, **kw)) == float(
            conv2d_spectral_norm(weight, size, **conv))
        tested += 1


def test_an_upsampling_layer_on_a_larger_input_is_tight():
    """Stride 2, kernel 4, padding 1 (the usual 2x upsampling) on 16 x 16 inputs: the zero-padding
    embedding is within a few per cent of the exact norm, and never below it."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen)
    exact = exact_conv_transpose2d_spectral_norm(weight, 16, stride=2, padding=1)
    bound = float(conv_transpose2d_spectral_norm(weight, 16, stride=2, padding=1))
    assert exact <= bound <= exact * 1.05


def test_stacked_kernels_are_bounded_each():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 4, 2, 3, 3, generator=gen)
    stacked = conv_transpose2d_spectral_norm(weights, 7, stride=2, padding=1, output_padding=1)
    alone = torch.stack([conv_transpose2d_spectral_norm(w, 7, stride=2, padding=1, output_padding=1)
                         for w in weights])
    torch.testing.assert_close(stacked, alone, rtol=1e-6, atol=0)


def test_the_gradient_is_the_bounds():
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: conv_transpose2d_spectral_norm(w, 5, stride=2, padding=1, n_iter=12, screen_iter=12), (weight,))


@pytest.mark.parametrize("kw, match", [
    (dict(output_padding=2, stride=2), "output_padding 2"),
    (dict(padding=-1), "padding"),
    (dict(padding=5), "output of size"),
    (dict(stride=0), "stride"),
    (dict(padding=1.5), "ints"),
])
def test_settings_pytorch_refuses_are_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        conv_transpose2d_spectral_norm(torch.randn(2, 2, 3, 3), 4, **kw)
