"""Adversarial soundness audit of conv_transpose2d_spectral_norm and of the first Gram iterate
from the kernel's autocorrelation (lipnet.bounds.symbol_gram).

The reference is the dense operator built from impulse responses of F.conv_transpose2d /
the symbols of lipnet.bounds.conv in float64; the bound must never be below it. Seeded,
randomized geometries: odd and even sizes, inputs smaller than the kernel, strides above the
kernel, dilations, output_padding at its maximum (up to the dilation - 1 when it exceeds the
stride), groups, padding modes, stacked, channels_last and non-contiguous kernels.
"""

import random

import pytest
import torch
import torch.nn.functional as F

import lipnet.bounds.conv as conv
from lipnet.bounds import conv2d_embedding, conv2d_spectral_norm, conv2d_symbol, conv_transpose2d_spectral_norm
from lipnet.bounds.hermitian import hermitian_real_form
from lipnet.bounds.symbol_gram import symbol_gram_real_form, symbol_lags


def dense_transpose_norm(weight, size, kw) -> float:
    """The exact norm of y -> F.conv_transpose2d(y, weight, **kw) on inputs of spatial ``size``."""
    c_in = weight.shape[0]
    n = c_in * size[0] * size[1]
    impulses = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *size)
    out = F.conv_transpose2d(impulses, weight.double(), **kw).reshape(n, -1)
    return float(torch.linalg.eigvalsh(out @ out.T)[-1].clamp_min(0).sqrt())  # the outputs outnumber the inputs


def adversarial_kernel(kind, shape, gen):
    weight = torch.randn(shape, dtype=torch.float64, generator=gen)
    k_h, k_w = shape[-2:]
    if kind == "constant":  # all energy at frequency 0
        return torch.ones(shape, dtype=torch.float64)
    if kind == "alternating":  # all energy at the Nyquist frequencies
        return torch.ones(shape, dtype=torch.float64) * ((-1.0) ** torch.arange(k_h))[:, None] * (-1.0) ** torch.arange(k_w)
    if kind == "one_tap":  # a tap that may read only the cropped border
        one = torch.zeros(shape, dtype=torch.float64)
        a, b = int(torch.randint(k_h, (1,), generator=gen)), int(torch.randint(k_w, (1,), generator=gen))
        one[..., a, b] = weight[..., a, b]
        return one
    return weight


def transpose_cases(seed, count, sizes=(1, 7)):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cases = []
    while len(cases) < count:
        groups = rng.choice([1, 1, 2, 3])
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 3)
        k = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (rng.randint(1, 5), rng.randint(1, 4))
        dilation = (rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3]))
        output_padding = tuple(rng.choice([0, max(s, d) - 1]) for s, d in zip(stride, dilation))
        padding = (rng.randint(0, 6), rng.randint(0, 6))
        size = (rng.randint(*sizes), rng.randint(*sizes))
        kw = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)
        kind = rng.choice(["gaussian", "constant", "alternating", "one_tap"])
        weight = adversarial_kernel(kind, (c_in, c_out // groups, *k), gen)
        try:
            if F.conv_transpose2d(torch.zeros(1, c_in, *size, dtype=torch.float64), weight, **kw).numel() == 0:
                continue
        except RuntimeError:
            continue
        cases.append((weight, size, kw, rng.choice(["contiguous", "channels_last", "transposed"])))
    return cases


def laid_out(weight, layout):
    if layout == "channels_last":
        return weight.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # same values, strides of a transposed kernel
        return weight.transpose(-1, -2).contiguous().transpose(-1, -2)
    return weight


@pytest.mark.parametrize("seed", range(4))
def test_transpose_bound_is_never_below_the_dense_norm(seed):
    for weight, size, kw, layout in transpose_cases(seed, 70):
        exact = dense_transpose_norm(weight, size, kw)
        bound = float(conv_transpose2d_spectral_norm(laid_out(weight, layout), size, **kw))
        assert bound >= exact * (1 - 1e-12), (tuple(weight.shape), size, kw, layout, exact, bound)
        bound32 = float(conv_transpose2d_spectral_norm(laid_out(weight.float(), layout), size, **kw))
        assert bound32 >= dense_transpose_norm(weight.float(), size, kw) * (1 - 1e-6), (size, kw, bound32)


def test_transpose_bound_of_stacked_kernels_on_larger_inputs_through_both_first_steps(monkeypatch):
    """Inputs large enough for the autocorrelation's first step (F > T^2), few Gram steps, and
    stacked kernels of very different scales; the symbols' own first step too."""
    cases = transpose_cases(10, 12, sizes=(6, 12))
    for use_lags in (True, False):
        if not use_lags:
            monkeypatch.setattr(conv, "_uses_symbol_lags", lambda *args: False)
        for weight, size, kw, _ in cases:
            stacked = torch.stack((weight, 1e3 * weight.flip(-1), 1e-3 * weight))
            bounds = conv_transpose2d_spectral_norm(stacked, size, n_iter=3, screen_iter=1, n_candidates=1, **kw)
            for layer, bound in zip(stacked, bounds):
                exact = dense_transpose_norm(layer, size, kw)
                assert float(bound) >= exact * (1 - 1e-12), (size, kw, use_lags, exact, float(bound))


@pytest.mark.parametrize("groups", [0, -2, True, 2.0])
def test_transpose_refuses_groups_that_are_not_positive_ints(groups):
    with pytest.raises(ValueError, match="groups must be a positive int"):
        conv_transpose2d_spectral_norm(torch.randn(4, 2, 3, 3), 8, groups=groups)


@pytest.mark.parametrize("size", [5, 40])  # the symbols' first Gram step, then the autocorrelation's
def test_transpose_refuses_in_channels_not_divisible_by_groups(size):
    with pytest.raises(ValueError, match=r"in_channels \(3.*divisible by groups \(2\)"):
        conv_transpose2d_spectral_norm(torch.randn(3, 2, 3, 3), size, padding=1, groups=2)


def test_autocorrelation_refuses_groups_not_dividing_out_channels():
    embedding = conv2d_embedding((3, 3), (9, 9), padding=1)
    lags = symbol_lags(embedding.height, embedding.width, torch.float64, torch.device("cpu"))
    for groups in (2, 0, -1):
        with pytest.raises(ValueError, match="groups must be a positive int dividing out_channels"):
            symbol_gram_real_form(torch.randn(1, 3, 2, 3, 3, dtype=torch.float64), lags, groups)


@pytest.mark.parametrize("seed", range(3))
def test_autocorrelation_gram_equals_the_symbols_gram_in_random_geometries(seed):
    """K(f) K(f)^H from the lags, for every frequency, group and stacked kernel, against the
    symbols themselves: every padding mode, strides above the kernel, dilations, 'same' and
    'valid', dead taps (padding that only one border reaches), odd and even sizes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    while checked < 40:
        groups = rng.choice([1, 1, 2, 3])
        k = (rng.randint(1, 5), rng.randint(1, 5))
        geometry = dict(stride=(rng.randint(1, 4), rng.randint(1, 4)), dilation=(rng.choice([1, 2, 3]), rng.choice([1, 2])),
                        padding=rng.choice([(rng.randint(0, 4), rng.randint(0, 4)), "same", "valid"]),
                        padding_mode=rng.choice(["zeros", "zeros", "circular", "reflect", "replicate"]))
        size = (rng.randint(1, 9), rng.randint(1, 9))
        try:
            embedding = conv2d_embedding(k, size, **geometry)
        except ValueError:
            continue
        weight = torch.randn(2, groups * rng.randint(1, 3), rng.randint(1, 3), *k, dtype=torch.float64, generator=gen)
        weight = laid_out(weight, rng.choice(["contiguous", "transposed"]))
        lags = symbol_lags(embedding.height, embedding.width, torch.float64, torch.device("cpu"))
        gram = symbol_gram_real_form(weight, lags, groups)
        for layer, kernel in enumerate(weight):
            symbol = conv2d_symbol(kernel, embedding, groups).flatten(0, 1)
            expected = hermitian_real_form(symbol @ symbol.mH)
            torch.testing.assert_close(gram[layer], expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item(),
                                       msg=lambda m: f"{k} {size} {geometry} groups={groups}: {m}")
        checked += 1


def test_bound_through_the_autocorrelation_with_few_steps_is_never_below_the_dense_norm(monkeypatch):
    """The autocorrelation's first step forced wherever it applies (the output side), with one
    screening step and one candidate, against the dense norm of F.conv2d on the padded input."""
    used = []

    def output_side(emb, shape, groups, frequencies, screen, device):
        used.append(screen >= 1 and shape[-4] // groups <= shape[-3] * emb.height.phases * emb.width.phases)
        return used[-1]

    monkeypatch.setattr(conv, "_uses_symbol_lags", output_side)
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    checked = 0
    while checked < 40:
        groups = rng.choice([1, 2])
        k = (rng.randint(1, 4), rng.randint(1, 4))
        stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.choice([1, 2]), rng.choice([1, 2]))
        padding, mode = (rng.randint(0, 3), rng.randint(0, 3)), rng.choice(["zeros", "circular", "reflect", "replicate"])
        size = (rng.randint(2, 8), rng.randint(2, 8))
        c_out, c_in = groups * rng.randint(1, 2), groups * rng.randint(1, 3)
        weight = adversarial_kernel(rng.choice(["gaussian", "constant", "alternating", "one_tap"]),
                                    (c_out, c_in // groups, *k), gen)
        try:
            padded = torch.zeros(1, c_in, *size, dtype=torch.float64)
            pad = (padding[1], padding[1], padding[0], padding[0])
            padded = F.pad(padded, pad, mode="constant" if mode == "zeros" else mode)
            if F.conv2d(padded, weight, stride=stride, dilation=dilation, groups=groups).numel() == 0:
                continue
            bound = float(conv2d_spectral_norm(weight, size, stride=stride, padding=padding, dilation=dilation,
                                               groups=groups, padding_mode=mode, n_iter=3, screen_iter=1,
                                               n_candidates=1))
        except (RuntimeError, ValueError):
            continue
        n = c_in * size[0] * size[1]
        impulses = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *size)
        out = F.conv2d(F.pad(impulses, pad, mode="constant" if mode == "zeros" else mode), weight, stride=stride,
                       dilation=dilation, groups=groups)
        exact = float(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))
        assert bound >= exact * (1 - 1e-12), (k, size, stride, padding, dilation, mode, groups, exact, bound)
        checked += 1
    assert sum(used) >= 20
