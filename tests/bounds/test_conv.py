"""Soundness and tightness of conv2d_spectral_norm against the exact operator norm.

The exact norm comes from the dense operator built from impulse responses of
F.conv2d in float64 (lipnet.bounds.reference), i.e. from PyTorch itself.
"""

import itertools
import math
import random

import pytest
import torch

from lipnet.bounds import (
    conv1d_spectral_norm,
    conv2d_embedding,
    conv2d_power_iteration,
    conv2d_spectral_norm,
    conv2d_symbol,
    exact_conv2d_spectral_norm,
)
from lipnet.bounds.circulant import distinct_frequencies
from lipnet.bounds.reference import conv2d_operator_matrix

MODES = ["zeros", "circular", "reflect", "replicate"]


def adversarial_kernel(kind, c_out, c_in_g, kh, kw, gen):
    """Kernels that stress the frequency grid, the borders and the stride phases."""
    shape = (c_out, c_in_g, kh, kw)
    if kind == "gaussian":
        return torch.randn(shape, dtype=torch.float64, generator=gen)
    if kind == "constant":  # all energy at frequency 0
        return torch.ones(shape, dtype=torch.float64)
    if kind == "alternating":  # energy at the Nyquist frequency
        sign_h = (-1.0) ** torch.arange(kh, dtype=torch.float64)
        sign_w = (-1.0) ** torch.arange(kw, dtype=torch.float64)
        return torch.ones(shape, dtype=torch.float64) * sign_h[:, None] * sign_w[None, :]
    if kind == "off_grid":  # a cosine whose peak falls between FFT grid points
        w0 = math.pi / (2.37 + torch.rand(1, generator=gen).item())
        a = torch.arange(kh, dtype=torch.float64)[:, None]
        b = torch.arange(kw, dtype=torch.float64)[None, :]
        base = torch.cos(w0 * (a + b))
        return base * torch.randn(c_out, c_in_g, 1, 1, dtype=torch.float64, generator=gen)
    if kind == "rank_one":  # identical channel mixing at every tap
        u = torch.randn(c_out, 1, 1, 1, dtype=torch.float64, generator=gen)
        v = torch.randn(1, c_in_g, 1, 1, dtype=torch.float64, generator=gen)
        return u * v * torch.randn(1, 1, kh, kw, dtype=torch.float64, generator=gen)
    if kind == "corner":  # a single tap in a corner: reads mostly padding
        kernel = torch.zeros(shape, dtype=torch.float64)
        kernel[..., -1, -1] = torch.randn(c_out, c_in_g, dtype=torch.float64, generator=gen)
        return kernel
    raise ValueError(kind)


KINDS = ["gaussian", "constant", "alternating", "off_grid", "rank_one", "corner"]


def random_case(rng):
    groups = rng.choice([1, 1, 2, 3])
    c_in = groups * rng.randint(1, 3)
    c_out = groups * rng.randint(1, 3)
    kernel = (rng.randint(1, 5), rng.randint(1, 5))
    stride = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
    dilation = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2]))
    mode = rng.choice(MODES)
    size = (rng.randint(1, 12), rng.randint(1, 12))
    if stride == (1, 1) and rng.random() < 0.25:
        padding = rng.choice(["same", "valid"])
    else:
        padding = (rng.randint(0, 4), rng.randint(0, 4))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    return c_in, c_out, kernel, size, kw


def accepted_by_pytorch(c_in, c_out, kernel, size, kw):
    try:
        layer = torch.nn.Conv2d(c_in, c_out, kernel, bias=False, **kw)
        layer(torch.zeros(1, c_in, *size))
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("seed", range(40))
def test_sound_on_random_and_adversarial_kernels(seed):
    """bound >= exact norm for every supported combination (~15 cases per seed)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    while checked < 15:
        c_in, c_out, kernel, size, kw = random_case(rng)
        if not accepted_by_pytorch(c_in, c_out, kernel, size, kw):
            with pytest.raises(ValueError):
                conv2d_spectral_norm(torch.randn(c_out, c_in // kw["groups"], *kernel), size, **kw)
            continue
        kind = KINDS[checked % len(KINDS)]
        weight = adversarial_kernel(kind, c_out, c_in // kw["groups"], *kernel, gen)
        exact = exact_conv2d_spectral_norm(weight, size, **kw)
        for n_iter, screen, k in [(10, 5, 8), (3, 1, 1), (0, 0, 1)]:
            bound = conv2d_spectral_norm(weight, size, n_iter=n_iter, screen_iter=screen, n_candidates=k, **kw).item()
            assert bound >= exact * (1 - 1e-12), (kind, c_in, c_out, kernel, size, kw, n_iter, bound, exact)
        bound32 = conv2d_spectral_norm(weight.float(), size, **kw).item()
        assert bound32 >= exact * (1 - 1e-5)
        checked += 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 2), (1, 4), (5, 2)])
def test_sound_on_grid_of_geometries(mode, stride, kernel):
    gen = torch.Generator().manual_seed(stride * 10 + kernel[0])
    for size in [(1, 1), (2, 5), (4, 4), (7, 3), (12, 12)]:
        for padding in [0, 1, (2, 1), 3]:
            kw = dict(stride=stride, padding=padding, padding_mode=mode)
            if not accepted_by_pytorch(3, 2, kernel, size, kw):
                continue
            weight = torch.randn(2, 3, *kernel, dtype=torch.float64, generator=gen)
            exact = exact_conv2d_spectral_norm(weight, size, **kw)
            assert conv2d_spectral_norm(weight, size, **kw).item() >= exact * (1 - 1e-12)


@pytest.mark.parametrize("c_in,c_out", [(1, 1), (4, 8), (8, 4), (5, 3)])
@pytest.mark.parametrize("n", [3, 4, 7, 10])
@pytest.mark.parametrize("kernel", [3, 5, (3, 1)])
def test_circular_same_is_tight(c_in, c_out, n, kernel):
    """The default float32 training bound is within 1e-5 of the exact circular norm, unless the
    kernel reaches around the input (5 taps on 3 or 4 samples): then two taps read one sample,
    and the axis is bounded by its copies instead (sound, not tight; see test_circular_aliasing)."""
    weight = torch.randn(c_out, c_in, *((kernel, kernel) if isinstance(kernel, int) else kernel))
    kw = dict(padding="same", padding_mode="circular")
    exact = exact_conv2d_spectral_norm(weight, n, **kw)
    bound = conv2d_spectral_norm(weight, n, **kw).item()
    aliased = max(weight.shape[-2:]) > n
    assert conv2d_embedding(weight.shape[-2:], n, **kw).exact != aliased
    if aliased:
        assert bound >= exact * (1 - 1e-6)
    else:
        assert abs(bound / exact - 1) < 1e-5


@pytest.mark.parametrize("c", [16, 32, 64])
def test_circular_same_is_tight_for_wider_layers(c):
    weight = torch.randn(c, c, 3, 3)
    exact = exact_conv2d_spectral_norm(weight, 8, padding=1, padding_mode="circular")
    bound = conv2d_spectral_norm(weight, 8, padding=1, padding_mode="circular").item()
    assert abs(bound / exact - 1) < 1e-5


def test_circular_stride_dividing_input_is_exact():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    kw = dict(stride=2, padding=1, padding_mode="circular")
    assert conv2d_embedding(3, 8, stride=2, padding=1, padding_mode="circular").exact
    exact = exact_conv2d_spectral_norm(weight, 8, **kw)
    assert conv2d_spectral_norm(weight, 8, n_iter=14, **kw).item() == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("n,limit", [(4, 1.25), (8, 1.06), (12, 1.03)])
def test_zero_padding_ratio_to_exact(n, limit):
    """Zero padding: the bound exceeds the exact norm only by the border effect."""
    ratios = []
    for _ in range(4):
        weight = torch.randn(4, 4, 3, 3, dtype=torch.float64)
        exact = exact_conv2d_spectral_norm(weight, n, padding=1)
        ratios.append(conv2d_spectral_norm(weight, n, padding=1).item() / exact)
    assert min(ratios) >= 1 - 1e-12
    assert max(ratios) <= limit, ratios


def test_strided_zero_padding_is_tight_via_polyphase():
    """Non-overlapping strided convolutions are exactly the polyphase circulant."""
    weight = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    exact = exact_conv2d_spectral_norm(weight, 8, stride=2)
    assert conv2d_spectral_norm(weight, 8, stride=2, n_iter=14).item() == pytest.approx(exact, rel=1e-10)
    # Ignoring the stride (the stride-1 bound) would be far looser.
    assert conv2d_spectral_norm(weight, 8, stride=1).item() > 1.3 * exact


def test_fft_at_input_size_is_unsound_for_zero_padding():
    """The check can fail: the naive FFT at size n undershoots the exact norm."""
    n = 2
    found = False
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        weight = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=gen)
        exact = exact_conv2d_spectral_norm(weight, n, padding=1)
        taps = torch.zeros(1, 1, n, n, dtype=torch.float64)  # the 3x3 kernel wrapped onto n x n
        for i, j in itertools.product(range(3), repeat=2):
            taps[..., (i - 1) % n, (j - 1) % n] += weight[..., i, j]
        naive = torch.fft.fft2(taps).abs().max().item()
        if naive < exact * (1 - 1e-3):
            found = True
            break
    assert found
    assert conv2d_spectral_norm(weight, n, padding=1).item() >= exact * (1 - 1e-12)


def test_fft_size_for_zero_padding():
    assert conv2d_embedding(3, 32, padding=1).height.fft_size == 33
    assert conv2d_embedding(5, 16, padding=2).height.fft_size == 18
    assert conv2d_embedding(3, 16, padding=0).height.fft_size == 16  # valid: no wrap needed
    assert conv2d_embedding(3, 16, stride=2, padding=1).height.phases == 2


def test_groups_take_the_maximum_not_the_product():
    weight = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    weight[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 0.5])
    bound = conv2d_spectral_norm(weight, 5, groups=4).item()
    assert bound == pytest.approx(3.0, rel=1e-9)


def test_reflect_and_replicate_bounds_account_for_copies():
    """Reflect/replicate padding copies border samples: a delta kernel shows the effect."""
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 0] = 1.0
    for mode in ["reflect", "replicate"]:
        exact = exact_conv2d_spectral_norm(weight, 6, padding=1, padding_mode=mode)
        assert exact > 1.0  # a copied sample enters the output twice
        assert conv2d_spectral_norm(weight, 6, padding=1, padding_mode=mode).item() >= exact


def test_symbol_shape_and_half_plane():
    weight = torch.randn(6, 2, 3, 3)
    emb = conv2d_embedding(3, (8, 9), stride=(2, 1), padding=1)
    symbol = conv2d_symbol(weight, emb, groups=2)
    n_h, n_w = emb.height.fft_size, emb.width.fft_size
    assert symbol.shape == (2, len(distinct_frequencies(n_h, n_w)), 3, 2 * 2)
    assert len(distinct_frequencies(n_h, n_w)) < n_h * (n_w // 2 + 1)  # rfft2's half-plane holds conjugates twice


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (2, 2), (5, 5), (6, 7), (8, 8)])
def test_the_symbols_are_rfft2_less_its_repeated_conjugates(size):
    """Each kept frequency's symbol is rfft2's (of the kernel placed on the circulant grid), and
    every half-plane frequency left out is the conjugate of one kept: its symbol's singular
    values are the same, so the maximum over the kept ones is the circulant's norm."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    emb = conv2d_embedding(3, size, padding=1, padding_mode="circular")
    n_h, n_w = emb.height.fft_size, emb.width.fft_size
    grid = torch.zeros(3, 2, n_h, n_w, dtype=torch.float64)
    for a, b in itertools.product(range(3), range(3)):
        grid[:, :, emb.height.tap_shift[a] % n_h, emb.width.tap_shift[b] % n_w] += weight[:, :, a, b]
    spectrum = torch.fft.rfft2(grid).permute(2, 3, 0, 1)  # (N_h, N_w // 2 + 1, c_out, c_in)
    symbol = conv2d_symbol(weight, emb)[0]
    kept = distinct_frequencies(n_h, n_w)
    for index, (f_h, f_w) in enumerate(kept):
        torch.testing.assert_close(symbol[index], spectrum[f_h, f_w])
    left_out = [f for f in itertools.product(range(n_h), range(n_w // 2 + 1)) if f not in kept]
    for f_h, f_w in left_out:
        mirror = (-f_h % n_h, -f_w % n_w)
        assert mirror in kept
        torch.testing.assert_close(spectrum[f_h, f_w], spectrum[mirror].conj())


def test_differentiable_and_gradcheck():
    weight = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda w: conv2d_spectral_norm(w, (5, 6), stride=(2, 1), padding=1, n_iter=6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight,))


@pytest.mark.parametrize("size", [6, 16])  # 16: the first Gram step from the autocorrelation
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, padding=1, groups=2)], ids=str)
def test_forward_mode_derivative_is_the_reverse_one_and_a_finite_difference(geometry, size):
    """jvp, jacfwd (vmapped jvp) and jacrev agree, for stacked kernels, with a central difference."""
    weight = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tangent = torch.randn_like(weight)

    def bound(w):
        return conv2d_spectral_norm(w, size, **geometry)
    _, forward = torch.func.jvp(bound, (weight,), (tangent,))
    step = 1e-6
    central = (bound(weight + step * tangent) - bound(weight - step * tangent)) / (2 * step)
    torch.testing.assert_close(forward, central, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.func.jacfwd(bound)(weight), torch.func.jacrev(bound)(weight))


def test_half_precision_and_autocast():
    weight = torch.randn(4, 4, 3, 3)
    ref = conv2d_spectral_norm(weight, 8, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = conv2d_spectral_norm(weight, 8, padding=1)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(ref.item(), rel=1e-6)
    half = conv2d_spectral_norm(weight.bfloat16(), 8, padding=1)
    assert half.dtype == torch.float32
    # The value too, not only its dtype: the bound of the bfloat16 kernel (computed in float32) is that of
    # the same values in float32, and at least the exact norm of the operator the rounded kernel applies.
    rounded = weight.bfloat16()
    assert half.item() == conv2d_spectral_norm(rounded.float(), 8, padding=1).item()
    assert half.item() >= exact_conv2d_spectral_norm(rounded.double(), 8, padding=1) * (1 - 1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(padding_mode="mirror"), "padding_mode"),
        (dict(padding="same", stride=2), "same"),
        (dict(padding="full"), "padding"),
        (dict(padding=5, padding_mode="circular"), "wraps"),
        (dict(padding=4, padding_mode="reflect"), "reflect"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv2d_spectral_norm(torch.randn(2, 2, 3, 3), 4, **kwargs)


def test_empty_output_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        conv2d_spectral_norm(torch.randn(2, 2, 5, 5), 3)


def test_references_agree_and_power_iteration_is_below():
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    fft = exact_conv2d_spectral_norm(weight, 6, padding=1, padding_mode="circular")
    dense = torch.linalg.matrix_norm(conv2d_operator_matrix(weight, 6, padding=1, padding_mode="circular"), 2)
    assert fft == pytest.approx(dense.item(), rel=1e-12)
    exact = exact_conv2d_spectral_norm(weight, 6, padding=1)
    lower = conv2d_power_iteration(weight, 6, padding=1, n_iter=200)
    assert lower <= exact * (1 + 1e-12)
    assert lower == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("config", [dict(padding=1), dict(padding=1, stride=2), dict(padding=2, dilation=2, groups=2),
                                    dict(padding=1, padding_mode="circular", groups=3), dict(stride=3)], ids=str)
def test_gradient_through_the_maximizing_frequency_matches_autograd(config):
    """The explicit backward (one frequency) equals autograd through every symbol matrix."""
    from lipnet.bounds.conv import conv2d_embedding, conv2d_symbol
    from lipnet.bounds.gram import max_matrix_spectral_norm

    torch.manual_seed(0)
    groups = config.get("groups", 1)
    weight = torch.randn(6, 6 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    geometry = {k: v for k, v in config.items() if k != "groups"}
    embedding = conv2d_embedding(3, 9, **geometry)
    reference = embedding.norm_factor * max_matrix_spectral_norm(
        conv2d_symbol(weight, embedding, groups).flatten(0, 1), 10, 5, 8)
    (expected,) = torch.autograd.grad(reference, weight)
    value = conv2d_spectral_norm(weight, 9, groups=groups, **geometry)
    (actual,) = torch.autograd.grad(value, weight)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda w: conv2d_spectral_norm(w, 9, groups=groups, **geometry), (weight,))


@pytest.mark.parametrize("config", [dict(padding=1), dict(padding=1, stride=2), dict(padding=2, dilation=2, groups=2),
                                    dict(padding=1, padding_mode="circular", groups=3), dict(stride=3),
                                    dict(padding=1, padding_mode="reflect")], ids=str)
def test_stacked_kernels_are_bounded_as_if_alone(config):
    """A stack ``(L, ...)`` gives each kernel its own bound (sound against the dense operator)
    and its own gradient, equal to bounding it alone, adversarial kernels included."""
    gen = torch.Generator().manual_seed(7)
    groups = config.get("groups", 1)
    kernels = [adversarial_kernel(kind, 6, 6 // groups, 3, 3, gen) for kind in KINDS]
    kernels[0] = kernels[0] * 1e3  # one kernel far larger than the rest
    weight = torch.stack(kernels).requires_grad_(True)
    size = (9, 7)
    bounds = conv2d_spectral_norm(weight, size, **config)
    assert bounds.shape == (len(KINDS),)
    coefficients = torch.linspace(1, 2, len(KINDS), dtype=torch.float64)
    (grad,) = torch.autograd.grad((bounds * coefficients).sum(), weight)
    for i, kernel in enumerate(kernels):
        alone = kernel.clone().requires_grad_(True)
        bound = conv2d_spectral_norm(alone, size, **config)
        (grad_alone,) = torch.autograd.grad(bound * coefficients[i], alone)
        torch.testing.assert_close(bounds[i], bound, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad[i], grad_alone, rtol=1e-9, atol=1e-12)
        assert bounds[i].item() >= exact_conv2d_spectral_norm(kernel, size, **config) * (1 - 1e-12)


@pytest.mark.parametrize("eps,n", [(0.003, 8), (0.01, 12), (0.03, 10)])
def test_near_isometric_kernels_are_refined_where_they_exceed(eps, n):
    """A residual kernel ``I + eps N``: every frequency's screened bound is above the maximum
    (flat spectra). On the CPU those frequencies are refined, so the default bound is within
    the tolerance of 10 steps on every frequency; screening alone (GPU, compiled) is not."""
    from lipnet.bounds import gram

    gen = torch.Generator().manual_seed(0)
    weight = eps * torch.randn(16, 16, 3, 3, generator=gen) / 12
    weight[torch.arange(16), torch.arange(16), 1, 1] += 1
    everywhere = conv2d_spectral_norm(weight.double(), n, padding=1, screen_iter=10)
    exact = exact_conv2d_spectral_norm(weight.double(), (n, n), padding=1)
    bound = conv2d_spectral_norm(weight, n, padding=1)
    assert exact * (1 - 1e-6) <= bound <= everywhere * (1 + gram.EXCEEDING_TOLERANCE + 1e-6)
    with gram.refine_exceeding(False):
        assert conv2d_spectral_norm(weight, n, padding=1) > everywhere * (1 + 2e-3)


def test_gradient_with_refined_exceeding_frequencies(monkeypatch):
    """The explicit backward of a bound whose maximum comes from frequencies refined beyond
    the candidates (one candidate; after 2 screening steps the near-isometry's other
    frequencies exceed it)."""
    from lipnet.bounds import gram

    refined = []
    refine = gram._refine
    monkeypatch.setattr(gram, "_refine", lambda g, ls, rows, *a: refined.append(rows.numel()) or refine(g, ls, rows, *a))
    gen = torch.Generator().manual_seed(1)
    weight = 0.05 * torch.randn(4, 4, 3, 3, dtype=torch.float64, generator=gen)
    weight[torch.arange(4), torch.arange(4), 1, 1] += 1
    weight.requires_grad_()
    fn = lambda w: conv2d_spectral_norm(w, 6, padding=1, n_iter=8, screen_iter=2, n_candidates=1)  # noqa: E731
    assert fn(weight) >= exact_conv2d_spectral_norm(weight.detach(), (6, 6), padding=1) * (1 - 1e-12)
    assert len(refined) >= 2 and refined[0] == 1 and sum(refined[1:]) > 1  # the candidate, then the exceeding ones
    assert torch.autograd.gradcheck(fn, (weight,))


def test_integer_arguments_of_any_integer_type_are_accepted_as_nn_conv2d_does():
    import numpy as np

    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3)
    reference = conv2d_spectral_norm(w, 8, stride=2, padding=1, dilation=1)
    for kind in (np.int64, np.int32):
        got = conv2d_spectral_norm(w, kind(8), stride=kind(2), padding=(kind(1), 1), dilation=kind(1))
        assert torch.equal(got, reference)
    with pytest.raises(ValueError, match="pair of ints"):
        conv2d_spectral_norm(w, 8, stride=2.0)


@pytest.mark.parametrize("bound, setting, value, name", [
    ("conv2d", "stride", True, "stride"),
    ("conv2d", "padding", True, "padding"),
    ("conv2d", "dilation", (1, True), "dilation"),
    ("conv2d", "input_size", True, "input size"),
    ("conv2d", "groups", True, "groups"),
    ("conv2d", "groups", 0, "groups"),
    ("conv2d", "groups", -1, "groups"),
    ("conv1d", "stride", True, "stride"),
    ("conv1d", "padding", (True,), "padding"),
    ("conv1d", "groups", False, "groups"),
    ("conv_transpose2d", "stride", True, "stride"),
    ("conv_transpose2d", "output_padding", False, "output_padding"),
    ("conv_transpose2d", "groups", True, "groups"),
])
def test_settings_pytorch_refuses_are_refused_by_name(bound, setting, value, name):
    """``F.conv2d`` and ``F.conv_transpose2d`` refuse a bool stride, padding, dilation or groups
    (and groups below 1): the bounds refuse them too, naming the setting, rather than bound an
    operator PyTorch never applies (a bool was taken as 1, groups 0 divided by zero)."""
    from lipnet.bounds.conv_transpose import conv_transpose2d_spectral_norm

    functions = dict(conv2d=conv2d_spectral_norm, conv1d=conv1d_spectral_norm,
                     conv_transpose2d=conv_transpose2d_spectral_norm)
    weight = torch.randn(4, 4, 3) if bound == "conv1d" else torch.randn(4, 4, 3, 3)
    kwargs = {"input_size": 8, setting: value}
    with pytest.raises(ValueError, match=name):
        functions[bound](weight, **kwargs)


def test_groups_of_any_integer_type_are_accepted():
    import numpy as np

    weight = torch.randn(4, 2, 3, 3)
    assert torch.equal(conv2d_spectral_norm(weight, 8, groups=np.int64(2)), conv2d_spectral_norm(weight, 8, groups=2))


@pytest.mark.parametrize("groups", [0, -1, True])
def test_the_symbol_refuses_groups_pytorch_refuses(groups):
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="conv2d: groups must be a positive int"):
        conv2d_symbol(weight, conv2d_embedding((3, 3), 8, padding=1), groups=groups)
