import pytest
import torch

import lipnet.bounds.conv as conv
import lipnet.bounds.gram as gram
from lipnet.bounds import conv2d_embedding, conv2d_spectral_norm, conv2d_symbol, exact_conv2d_spectral_norm
from lipnet.bounds.gram import screening_steps
from lipnet.bounds.hermitian import hermitian_real_form
from lipnet.bounds.circulant import distinct_frequencies
from lipnet.bounds.symbol_gram import symbol_gram_real_form, symbol_lags

GEOMETRIES = [
    dict(padding=1),
    dict(padding=1, padding_mode="circular"),
    dict(padding=2, stride=2),
    dict(padding=(1, 2), stride=(1, 3), dilation=(2, 1)),
    dict(padding=2, dilation=2, groups=2),
    dict(padding=1, padding_mode="reflect", groups=3),
    dict(padding=0),
]


def _lags_used(weight, size, **kw):
    embedding = conv2d_embedding(weight.shape[-2:], size, **{k: v for k, v in kw.items() if k != "groups"})
    groups = kw.get("groups", 1)
    frequencies = len(distinct_frequencies(embedding.height.fft_size, embedding.width.fft_size))
    screen = screening_steps(groups * frequencies, 10, 5, 8)
    return conv._uses_symbol_lags(embedding, weight.shape, groups, frequencies, screen, weight.device)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kernel", [(3, 3), (2, 4), (1, 1)])
def test_gram_of_every_symbol_from_the_autocorrelation(geometry, kernel):
    """The real forms of K(f) K(f)^H, for every frequency and group of stacked kernels."""
    groups = geometry.get("groups", 1)
    embedding = conv2d_embedding(kernel, (11, 9), **{k: v for k, v in geometry.items() if k != "groups"})
    weights = torch.randn(2, 6, 12 // groups, *kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lags = symbol_lags(embedding.height, embedding.width, torch.float64, torch.device("cpu"))
    gram = symbol_gram_real_form(weights, lags, groups)
    for layer, weight in enumerate(weights):
        symbol = conv2d_symbol(weight, embedding, groups).flatten(0, 1)
        expected = hermitian_real_form(symbol @ symbol.mH)
        torch.testing.assert_close(gram[layer], expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def _symbol_path(monkeypatch):
    monkeypatch.setattr(conv, "_uses_symbol_lags", lambda *args: False)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_bound_and_gradient_equal_the_symbol_path(geometry, monkeypatch):
    """Same bound and gradient as with the Gram products of all symbols (float64; that path's
    soundness is tested in test_conv.py), stacked kernels of different scales included."""
    groups = geometry.get("groups", 1)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 6, 6 // groups, 3, 3, dtype=torch.float64, generator=gen)
    weight[1] *= 1e3
    weight.requires_grad_(True)
    size = (20, 30)
    assert _lags_used(weight[0], size, **geometry)
    bounds = conv2d_spectral_norm(weight, size, **geometry)
    (grad,) = torch.autograd.grad(bounds.sum(), weight)
    _symbol_path(monkeypatch)
    expected = conv2d_spectral_norm(weight, size, **geometry)
    (expected_grad,) = torch.autograd.grad(expected.sum(), weight)
    torch.testing.assert_close(bounds, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_autocorrelation_with_complex_products_after_it(monkeypatch):
    """Where the real form does not pay (an eager GPU bound of small matrices),
    max_gram_bound_of_grams turns the first iterates back into complex matrices: the same
    bound and gradient."""
    weight = torch.randn(2, 8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    bounds = conv2d_spectral_norm(weight, 12, padding=1)
    (grad,) = torch.autograd.grad(bounds.sum(), weight)
    monkeypatch.setattr(gram, "arithmetic_dominates", lambda batch, size, device: False)
    assert _lags_used(weight[0], 12, padding=1)
    expected = conv2d_spectral_norm(weight, 12, padding=1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), weight)
    torch.testing.assert_close(bounds, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_through_the_autocorrelation():
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert _lags_used(weight, 12, padding=1)
    assert torch.autograd.gradcheck(lambda w: conv2d_spectral_norm(w, 12, padding=1, n_iter=6), (weight,))


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_float32_kernels_of_any_scale(magnitude):
    """The kernel is scaled before its autocorrelation: no overflow or underflow in float32."""
    weight = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _lags_used(weight, 12, padding=1)
    exact = exact_conv2d_spectral_norm(weight, 12, padding=1)
    bound64 = conv2d_spectral_norm(weight, 12, padding=1).item()
    bound = conv2d_spectral_norm((weight * magnitude).float(), 12, padding=1).item() / magnitude
    assert bound >= exact * (1 - 1e-5)
    assert bound == pytest.approx(bound64, rel=1e-5)


def test_zero_nan_and_dead_kernels():
    assert conv2d_spectral_norm(torch.zeros(4, 4, 3, 3), 12, padding=1).item() == 0
    weight = torch.randn(4, 4, 3, 3)
    weight[1, 2, 0, 0] = float("nan")
    assert torch.isnan(conv2d_spectral_norm(weight, 12, padding=1))
    # Every tap reads only padding (no live pair of taps): the operator is zero.
    dead = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    bound = conv2d_spectral_norm(dead, (1, 12), padding=(5, 1), dilation=(5, 1))
    assert bound.item() >= exact_conv2d_spectral_norm(dead, (1, 12), padding=(5, 1), dilation=(5, 1)) * (1 - 1e-12)


@pytest.mark.parametrize("kind", ["constant", "alternating", "rank_one", "gaussian"])
@pytest.mark.parametrize("settings", [(10, 5, 8), (3, 1, 1), (2, 1, 4)])
def test_sound_for_adversarial_kernels_and_few_steps(kind, settings):
    """Kernels whose symbols vanish at many frequencies (where the autocorrelation's rounding
    can make a first iterate indefinite), with bounds read after the first step."""
    gen = torch.Generator().manual_seed(3)
    shape = (3, 5, 3, 3)
    weight = {"constant": torch.ones(shape, dtype=torch.float64),
              "alternating": torch.ones(shape, dtype=torch.float64) * (-1.0) ** torch.arange(3.0)[:, None],
              "rank_one": torch.randn(3, 1, 1, 1, dtype=torch.float64, generator=gen)
              * torch.randn(1, 5, 3, 3, dtype=torch.float64, generator=gen),
              "gaussian": torch.randn(shape, dtype=torch.float64, generator=gen)}[kind]
    for size, kw in [((12, 12), dict(padding=1)), ((13, 11), dict(padding=1, padding_mode="replicate"))]:
        assert _lags_used(weight, size, **kw)
        exact = exact_conv2d_spectral_norm(weight, size, **kw)
        n_iter, screen, k = settings
        bound = conv2d_spectral_norm(weight, size, n_iter=n_iter, screen_iter=screen, n_candidates=k, **kw).item()
        assert bound >= exact * (1 - 1e-12)
        assert conv2d_spectral_norm(weight.float(), size, **kw).item() >= exact * (1 - 1e-5)


def test_when_the_autocorrelation_is_used(monkeypatch):
    """For large inputs (F > T^2 frequencies), on the output side, with the first step taken,
    where arithmetic sets the bound's time: on the CPU, for a large eager bound off it (here
    8 stacked layers), and wherever launches cost no host time."""
    emb = conv2d_embedding(3, 32, padding=1)
    frequencies = len(distinct_frequencies(emb.height.fft_size, emb.width.fft_size))
    cpu = torch.device("cpu")
    assert conv._uses_symbol_lags(emb, (64, 64, 3, 3), 1, frequencies, 5, cpu)
    assert not conv._uses_symbol_lags(emb, (64, 64, 3, 3), 1, frequencies, 5, torch.device("meta"))
    assert not conv._uses_symbol_lags(emb, (64, 64, 3, 3), 1, frequencies, 0, cpu)  # Frobenius screening
    assert not conv._uses_symbol_lags(emb, (65, 64, 3, 3), 1, frequencies, 5, cpu)  # K^H K is the smaller side
    small = conv2d_embedding(3, 8, padding=1)
    assert not conv._uses_symbol_lags(small, (256, 256, 3, 3), 1, len(distinct_frequencies(9, 9)), 5, cpu)
    meta = torch.device("meta")
    assert conv._uses_symbol_lags(emb, (8, 128, 128, 3, 3), 1, frequencies, 5, meta)
    assert not conv._uses_symbol_lags(emb, (8, 128, 128, 3, 3), 1, frequencies, 0, meta)
    monkeypatch.setattr(gram, "launches_are_free", lambda device: True)
    assert conv._uses_symbol_lags(emb, (64, 64, 3, 3), 1, frequencies, 5, meta)


@pytest.mark.slow
def test_compiled_bound_equals_eager():
    """One graph with the autocorrelation path (its constants built inside the graph), with the
    eager value and gradient."""
    import torch._dynamo

    torch._dynamo.reset()
    weight = torch.randn(8, 8, 3, 3, requires_grad=True, generator=torch.Generator().manual_seed(4))
    assert _lags_used(weight, 12, padding=1)
    compiled = torch.compile(lambda w: conv2d_spectral_norm(w, 12, padding=1), fullgraph=True)
    value = compiled(weight)
    (grad,) = torch.autograd.grad(value, weight)
    expected = conv2d_spectral_norm(weight, 12, padding=1)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    # float32 gradients of a bound after 2^10-th powers: accurate to about 1e-4 in norm either way
    assert (grad - expected_grad).norm() < 1e-3 * expected_grad.norm()
