"""Mutation-testing gaps of lipnet.bounds.gram, checked against exact norms."""

import math

import pytest
import torch

from lipnet.bounds.gram import max_gram_bound_of_grams


def test_a_float32_log_scale_is_raised_by_its_rounding():
    """``max_gram_bound_of_grams`` takes a log-scale in float32 as rounded by up to one unit: the
    Gram matrix ``s^2 I`` (real form of the complex identity times ``s^2``) of a matrix of norm
    ``s``, given as ``2 log(s)`` computed by ``torch.log`` in float32, must still be bounded by at
    least ``s``. The identity is where the trace form is exact, so nothing else covers a logarithm
    rounded down (it is, for about half of these scales, by up to ``4e-6`` relative)."""
    scales = torch.tensor([1e10 * (1 + k / 37) for k in range(40)] + [3e-12 * (1 + k / 41) for k in range(40)],
                          dtype=torch.float32)
    gram = torch.eye(4, dtype=torch.float64).expand(len(scales), 1, 4, 4).clone()
    log_scale = 2 * torch.log(scales)[:, None]  # float32: the caller's rounding
    found = max_gram_bound_of_grams(gram, log_scale, 3, 3, 1)
    exact = scales.double()  # sigma_max of s I, s exactly the float32 value
    below = [(float(s), float(b)) for s, b in zip(exact, found.value) if not b >= s]
    assert not below, below[:3]
    # and not vacuous: within a few float32 units of the norm
    assert bool((found.value <= exact * (1 + 1e-5)).all())


def test_the_gradient_of_an_exactly_scalar_gram_matrix_is_finite_and_bounded():
    """For a multiple of an orthogonal matrix every Gram iterate is exactly scalar, so the spread of
    the trace form is 0; the floor ``tau m`` of ``s'`` keeps the bound differentiable there. The bound
    is a norm-like function of ``W`` (1-Lipschitz in the Frobenius norm, up to that smoothing), so its
    gradient has Frobenius norm at most about 1, here ``1 / sqrt(r)`` (the gradient of
    ``(tr (W^T W)^(2^t) / r)^(1 / 2^(t+1))``, which the trace form equals up to ``tau``)."""
    from lipnet.bounds.gram import matrix_spectral_norm, max_matrix_spectral_norm

    hadamard = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = torch.kron(torch.kron(hadamard, hadamard), hadamard) / math.sqrt(8)  # orthogonal, entries exact
    for w in (3 * torch.eye(8, dtype=torch.float64), 0.5 * q):
        for bound in (lambda m: matrix_spectral_norm(m, n_iter=6), lambda m: max_matrix_spectral_norm(m[None], 6)):
            m = w.clone().requires_grad_()
            value = bound(m)
            (grad,) = torch.autograd.grad(value, m)
            assert bool(torch.isfinite(grad).all())
            assert abs(float(value.detach()) / float(torch.linalg.matrix_norm(w, ord=2)) - 1) < 1e-6
            assert abs(float(grad.norm()) - 1 / math.sqrt(8)) < 1e-4



def test_screening_refines_the_largest_candidates():
    """With the refinement of exceeding matrices off (as on a GPU), only the ``n_candidates`` largest
    screened bounds get all ``n_iter`` steps: for a batch whose largest norm stands out, the result is
    the refined bound of that matrix, within ``1e-6`` of its float64 SVD norm, where 2 screening steps
    alone are several per cent above it."""
    from lipnet.bounds import refine_exceeding
    from lipnet.bounds.gram import max_matrix_spectral_norm

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 12, 12, generator=generator, dtype=torch.float64)
    batch[17] *= 3  # the maximizer, well above the others
    exact = float(torch.linalg.matrix_norm(batch, ord=2).max())
    with refine_exceeding(False):
        screened = float(max_matrix_spectral_norm(batch, n_iter=2, screen_iter=2, n_candidates=4))
        bound = float(max_matrix_spectral_norm(batch, n_iter=14, screen_iter=2, n_candidates=4))
    assert screened > exact * 1.01
    assert exact <= bound <= exact * (1 + 1e-6)


def test_an_indefinite_first_iterate_falls_back_to_the_frobenius_form():
    """A first Gram iterate built from the autocorrelation (not as ``A^H A``) can be indefinite by
    rounding where the symbol nearly vanishes, and with one Gram step its trace form is read off it
    directly: a negative trace form (here ``-1e-30 I``, whose exact matrix is about 0) must give way
    to the Frobenius form, not a NaN that hides the batch's maximum (the identity's, 1)."""
    gram = torch.stack([torch.eye(4, dtype=torch.float64), -1e-30 * torch.eye(4, dtype=torch.float64)])[None]
    found = max_gram_bound_of_grams(gram, torch.zeros(1, 2, dtype=torch.float64), 1, 1, 1)
    assert float(found.value[0]) == pytest.approx(1.0, rel=1e-7)
    assert int(found.best[0]) == 0
