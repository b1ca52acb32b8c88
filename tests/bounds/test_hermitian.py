import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipnet.bounds.gram as gram
from lipnet.bounds.gram import max_gram_bound, max_gram_bound_grad, uses_real_form
from lipnet.bounds.hermitian import gram_real_form, hermitian_from_real_form, hermitian_real_form, square_real_form


def random_hermitian(*shape, generator=None):
    a = torch.randn(*shape, dtype=torch.complex128, generator=generator)
    return a + a.mH


@pytest.mark.parametrize("r", [1, 2, 7, 32])
def test_real_form_keeps_what_a_gram_bound_reads(r):
    """Same Frobenius norm, diagonal and trace statistics as the Hermitian matrix; lossless."""
    g = random_hermitian(3, r, r, generator=torch.Generator().manual_seed(r))
    m = hermitian_real_form(g)
    assert m.dtype == torch.float64
    torch.testing.assert_close(hermitian_from_real_form(m), g, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(m), torch.linalg.matrix_norm(g), rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.diagonal(m, dim1=-2, dim2=-1), torch.diagonal(g, dim1=-2, dim2=-1).real)
    for ours, theirs in zip(gram._trace_statistics(m, differentiable=False), gram._trace_statistics(g, differentiable=False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(4, 3, 9), (2, 5, 5), (4, 9, 3), (1, 1, 6), (2, 3, 6, 1)])
def test_gram_real_form_is_the_gram_matrix_on_the_smaller_side(shape):
    a = torch.randn(shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    expected = a @ a.mH if shape[-2] <= shape[-1] else a.mH @ a
    torch.testing.assert_close(hermitian_from_real_form(gram_real_form(a)), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 24), batch=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_square_real_form_is_the_square(r, batch, seed):
    g = random_hermitian(batch, r, r, generator=torch.Generator().manual_seed(seed))
    squared = hermitian_from_real_form(square_real_form(hermitian_real_form(g)))
    scale = torch.linalg.matrix_norm(g).amax() ** 2
    assert ((squared - g @ g).abs().amax() / scale) < 1e-13


def test_real_form_squares_stay_accurate_in_float32():
    """Ten squarings with Frobenius rescaling, as the bound takes them: the float32 real form
    is as close to the float64 result as the float32 complex products are."""
    g = random_hermitian(4, 64, 64, generator=torch.Generator().manual_seed(5))
    exact, complex32, real32 = g, g.to(torch.complex64), hermitian_real_form(g).float()
    for _ in range(10):
        exact = exact / torch.linalg.matrix_norm(exact, keepdim=True)
        complex32 = complex32 / torch.linalg.matrix_norm(complex32, keepdim=True)
        real32 = real32 / torch.linalg.matrix_norm(real32, keepdim=True)
        exact, complex32, real32 = exact @ exact, complex32 @ complex32, square_real_form(real32)
    exact = exact / torch.linalg.matrix_norm(exact, keepdim=True)
    errors = [(hermitian_real_form(exact) - hermitian_real_form(x.to(torch.complex128)) / torch.linalg.matrix_norm(x, keepdim=True).double()).norm()
              for x in (complex32, hermitian_from_real_form(real32))]
    assert errors[1] < max(3 * errors[0], 1e-6)


def _complex_path(monkeypatch):
    monkeypatch.setattr(gram, "uses_real_form", lambda mat: False)


@pytest.mark.parametrize("shape", [(40, 6, 9), (12, 8, 8), (30, 9, 5), (3, 20, 4, 6)], ids=str)
@pytest.mark.parametrize("screen,n_iter", [(5, 10), (0, 6), (3, 3)])
def test_max_gram_bound_in_real_form_equals_complex_products(shape, screen, n_iter, monkeypatch):
    """Same value, maximizer, step counts and gradient as with complex products (float64),
    stacked batches and screening included; sound against the exact norms."""
    mats = torch.randn(shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    assert uses_real_form(mats)
    real = max_gram_bound(mats, n_iter, screen, 4, keep_iterates=True)
    stops = gram.bound_steps(shape[-3], n_iter, screen, 4)
    real_grad = max_gram_bound_grad(real, n_iter, stops)
    _complex_path(monkeypatch)
    ref = max_gram_bound(mats, n_iter, screen, 4, keep_iterates=True)
    torch.testing.assert_close(real.value, ref.value, rtol=1e-12, atol=0)
    assert torch.equal(real.best, ref.best) and torch.equal(real.steps, ref.steps)
    torch.testing.assert_close(real_grad, max_gram_bound_grad(ref, n_iter, stops), rtol=1e-9, atol=1e-12)
    exact = torch.linalg.matrix_norm(mats, ord=2).amax(-1)
    assert torch.all(real.value >= exact * (1 - 1e-12))


def test_kept_iterates_in_real_form_give_the_recomputed_gradient():
    """A small complex batch keeps its iterates (in real form) for the backward: the gradient
    equals the one recomputed from the normalized matrix."""
    mats = torch.randn(15, 12, 20, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    kept = max_gram_bound(mats, 10, 5, 8, keep_iterates=True)
    assert kept.iterates is not None and kept.iterates.is_complex()
    recomputed = kept._replace(iterates=None, iterate_log_scales=None)
    torch.testing.assert_close(max_gram_bound_grad(kept, 10, (10,)), max_gram_bound_grad(recomputed, 10, (10,)),
                               rtol=1e-9, atol=1e-12)


def test_zero_and_nan_matrices_in_real_form():
    mats = torch.randn(6, 4, 5, dtype=torch.complex64)
    mats[2] = 0
    zero = max_gram_bound(torch.zeros(3, 4, 5, dtype=torch.complex64), 8, 5, 1)
    assert zero.value.item() == 0
    assert torch.isfinite(max_gram_bound(mats, 8, 5, 1).value)
    mats[4, 1, 1] = float("nan")
    assert torch.isnan(max_gram_bound(mats, 8, 5, 1).value)


def test_real_form_policy(monkeypatch):
    """Always for complex matrices on the CPU and where launches cost no host time (compiled,
    replayed); for an eager GPU bound only from EAGER_ARITHMETIC_MIN_WORK
    multiply-adds per step (below, its launches dominate); never for real matrices."""
    work = gram.EAGER_ARITHMETIC_MIN_WORK
    assert uses_real_form(torch.zeros(2, 3, 3, dtype=torch.complex64))
    assert not uses_real_form(torch.zeros(2, 3, 3))
    size = 256
    batch = -(-work // size**3)
    big = torch.zeros(batch, size, 3 * size, dtype=torch.complex64, device="meta")
    assert uses_real_form(big)
    assert uses_real_form(big.unflatten(0, (batch // 2, 2)))  # stacked batches count together
    assert not uses_real_form(big[:batch - 1])
    assert not uses_real_form(torch.zeros(4, 64, 64, dtype=torch.complex64, device="meta"))
    assert gram.arithmetic_dominates(1, 2, torch.device("cpu"))
    monkeypatch.setattr(gram, "launches_are_free", lambda device: True)
    assert uses_real_form(torch.zeros(4, 64, 64, dtype=torch.complex64, device="meta"))
