import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.bounds import conv2d_spectral_norm, gram, matrix_spectral_norm, max_matrix_spectral_norm
from lipnet.bounds.reference import conv2d_operator_matrix


def exact_norm(mat):
    return torch.linalg.matrix_norm(mat.detach().to(torch.complex128 if mat.is_complex() else torch.float64), ord=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (16, 16), (4, 2, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("n_iter", [0, 1, 3, 6, 10])
def test_bound_is_above_sigma_max(dtype, shape, n_iter):
    mat = torch.randn(shape, dtype=dtype)
    bound = matrix_spectral_norm(mat, n_iter)
    assert bound.shape == shape[:-2]
    rel = 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-5
    assert torch.all(bound.double() >= exact_norm(mat) * (1 - rel))


@pytest.mark.parametrize("n_iter", [0, 1, 2, 5, 10, 20])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1.0, 1e20, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_overflow_or_underflow(n_iter, magnitude, dtype):
    mat = torch.randn(6, 9, dtype=torch.float64) * magnitude
    exact = exact_norm(mat)
    bound = matrix_spectral_norm(mat.to(dtype), n_iter).double()
    assert torch.isfinite(bound) and bound > 0
    # Upper bound up to the rounding of the dtype, and no looser than Frobenius.
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert bound >= exact * (1 - rel)
    assert bound <= torch.linalg.matrix_norm(mat) * (1 + rel)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    """All singular values equal: the trace form is exact up to its smoothing (about 1e-6 after
    10 steps), so an undershoot of the bound shows."""
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_float32_bounds_of_extreme_matrices_are_above_their_float64_norm(magnitude):
    """The log-scale is carried in float64: in float32 its rounding, relative to |log scale|
    (about 69 here), let these bounds undershoot the norm by up to 1e-5."""
    q = _orthogonal(16, seed=1)
    for k in range(40):
        mat = (q * (magnitude * 10 ** (k / 40))).float()
        exact = exact_norm(mat)
        for bound in (matrix_spectral_norm(mat, 10), max_matrix_spectral_norm(mat[None], 10)):
            assert bound.dtype == torch.float32
            assert bound.double() >= exact * (1 - 1e-7)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
@pytest.mark.parametrize("kernel_size", [1, 3], ids=["autocorrelation", "symbols"])
def test_float32_conv_bounds_of_extreme_kernels_are_above_the_dense_float64_norm(magnitude, kernel_size):
    """As above through both ways of the first Gram step of a convolution: from the kernel's
    autocorrelation (a 1x1 kernel: its float32 log-scale comes in from the caller) and from
    the symbols; against the SVD of the dense operator."""
    q, centre = _orthogonal(8, seed=2), kernel_size // 2
    for k in range(12):
        weight = torch.zeros(8, 8, kernel_size, kernel_size, dtype=torch.float64)
        weight[:, :, centre, centre] = q * (magnitude * 10 ** (k / 12))
        weight = weight.float()
        geometry = dict(padding=centre, padding_mode="circular")
        exact = torch.linalg.matrix_norm(conv2d_operator_matrix(weight, 4, **geometry), 2)
        bound = conv2d_spectral_norm(weight, 4, n_iter=10, screen_iter=10, **geometry)
        assert bound.dtype == torch.float32
        assert bound.double() >= exact * (1 - 1e-7)


def test_mixed_scales_in_one_matrix():
    mat = torch.tensor([[1e30, 0.0], [0.0, 1e-30]])
    assert matrix_spectral_norm(mat, 20).item() == pytest.approx(1e30, rel=1e-5)


@pytest.mark.parametrize("n_iter", range(0, 8))
def test_monotone_in_n_iter_and_between_sigma_and_schatten(n_iter):
    mat = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    mat = q @ mat
    b_t = matrix_spectral_norm(mat, n_iter)
    b_next = matrix_spectral_norm(mat, n_iter + 1)
    assert b_next <= b_t * (1 + 1e-14)
    # Never looser than the Schatten-p norm (sum sigma^p)^(1/p), p = 2^(t+1): Gram iteration.
    p = 2 ** (n_iter + 1)
    assert 5.0 <= b_t.item() <= (5.0**p + 3.0**p + 1.0) ** (1 / p) * (1 + 1e-12)
    if n_iter == 0:
        assert b_t.item() == pytest.approx(35**0.5, rel=1e-12)  # Frobenius


def test_trace_form_value():
    """After one step H = W^T W has eigenvalues 25, 9, 1: m + sqrt(2) s beats ||H||_F."""
    mat = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    eig = torch.tensor([25.0, 9.0, 1.0], dtype=torch.float64)
    m, s = eig.mean(), ((eig - eig.mean()).square().mean()).sqrt()
    expected = (m + 2**0.5 * s).sqrt().item()
    assert expected < (25.0**2 + 9.0**2 + 1.0) ** 0.25
    assert matrix_spectral_norm(mat, 1).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", range(1, 6))
def test_equal_singular_values_are_exact(t):
    """The Frobenius form alone would be loose by rank^(1/2^(t+1)); the trace form is exact
    up to its smoothing sqrt(r) * sqrt(eps) / 2^t."""
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    assert matrix_spectral_norm(3 * q, t).item() == pytest.approx(3.0, rel=1e-7 / 2**t)
    assert matrix_spectral_norm(3 * q, t).item() >= 3.0 * (1 - 1e-14)
    assert matrix_spectral_norm(3 * q, 0).item() == pytest.approx(12.0, rel=1e-12)  # Frobenius: 4x
    symbols = torch.linalg.qr(torch.randn(40, 8, 8, dtype=torch.complex128))[0]
    assert max_matrix_spectral_norm(symbols, 10, t, 4).item() == pytest.approx(1.0, rel=1e-7)
    orthogonal32 = torch.linalg.qr(torch.randn(64, 64))[0]
    assert matrix_spectral_norm(orthogonal32, 5).item() == pytest.approx(1.0, rel=1e-4)


def test_zero_matrix_gives_zero_with_finite_gradient():
    mat = torch.zeros(2, 4, 3, requires_grad=True)
    bound = matrix_spectral_norm(mat, 6)
    assert torch.equal(bound, torch.zeros(2))
    bound.sum().backward()
    assert torch.isfinite(mat.grad).all()
    mat2 = torch.zeros(5, 4, 3, requires_grad=True)
    max_matrix_spectral_norm(mat2, 6, 2, 1).backward()
    assert torch.isfinite(mat2.grad).all()


def test_nan_propagates():
    mat = torch.randn(3, 3)
    mat[1, 1] = float("nan")
    assert torch.isnan(matrix_spectral_norm(mat, 5))
    assert torch.isnan(max_matrix_spectral_norm(mat[None], 5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("n_iter", [0, 1, 4])
def test_gradcheck_autograd_version(dtype, n_iter):
    mat = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: matrix_spectral_norm(m, n_iter), (mat,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(1, 3, 3), (6, 4, 3), (40, 3, 5)])
@pytest.mark.parametrize("n_iter,screen_iter,n_candidates", [(0, 0, 1), (1, 0, 1), (4, 4, 8), (5, 2, 3), (7, 3, 2)])
def test_gradcheck_explicit_backward(dtype, shape, n_iter, screen_iter, n_candidates):
    mat = torch.randn(shape, dtype=dtype, requires_grad=True)
    fn = lambda m: max_matrix_spectral_norm(m, n_iter, screen_iter, n_candidates)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mat,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_unscreened_wide_matrices_take_the_smaller_side(dtype):
    """With ``screen_iter=0`` the candidates' first Gram step is taken in the refinement; on the
    smaller side, as everywhere else: for wide matrices with orthonormal rows the trace form
    is then exact up to its smoothing (real matrices took the larger side, and the trace form
    of the padded spectrum (1, 1, 1, 0, 0) read 26% high), and the explicit gradient, which
    assumes the smaller side, agrees."""
    rows = torch.linalg.qr(torch.randn(6, 5, 3, dtype=dtype))[0].mT  # (6, 3, 5), orthonormal rows
    # Scales 1, 2, .., 32: the screened Frobenius norms (at most 16 sqrt(3)) stay below the candidate's 32.
    mat = (rows * (2.0 ** torch.arange(6, dtype=torch.float64)).to(dtype)[:, None, None]).requires_grad_()
    fn = lambda m: max_matrix_spectral_norm(m, 1, 0, 1)  # noqa: E731
    torch.testing.assert_close(fn(mat), torch.tensor(32.0, dtype=torch.float64), rtol=1e-7, atol=0)
    assert torch.autograd.gradcheck(fn, (mat,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("spread", [0.0, 1e-3, 0.05])
def test_gradcheck_trace_form(dtype, spread):
    """Near-orthogonal matrices select the trace form; its explicit gradient is checked."""
    q = torch.linalg.qr(torch.randn(6, 5, 5, dtype=dtype))[0]
    sv = 1 - spread * torch.rand(6, 5, dtype=torch.float64)
    sv = sv * (1 + 0.1 * torch.arange(6, dtype=torch.float64))[:, None]  # no ties across the batch
    mat = (q * sv[:, None, :].to(dtype)).requires_grad_()
    for n_iter, screen in [(3, 3), (6, 2)]:
        fn = lambda m: max_matrix_spectral_norm(m, n_iter, screen, 2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (mat,))
        bound = fn(mat)
        assert bound >= torch.linalg.matrix_norm(mat.detach(), 2).max() * (1 - 1e-12)
        (g_fast,) = torch.autograd.grad(bound, mat)
        (g_slow,) = torch.autograd.grad(matrix_spectral_norm(mat, n_iter).max(), mat) if n_iter == screen else (None,)
        if g_slow is not None:
            torch.testing.assert_close(g_fast, g_slow)


def test_explicit_backward_matches_autograd():
    mat = torch.randn(50, 6, 6, dtype=torch.float64, requires_grad=True)
    fast = max_matrix_spectral_norm(mat, 6, 6, 1)
    (g_fast,) = torch.autograd.grad(fast, mat)
    slow = matrix_spectral_norm(mat, 6).max()
    (g_slow,) = torch.autograd.grad(slow, mat)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-14)
    torch.testing.assert_close(g_fast, g_slow)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 40),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    screen=st.integers(0, 6),
    n_iter=st.integers(0, 9),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-60, 60),
)
def test_max_bound_is_sound_whatever_the_screening(batch, rows, cols, screen, n_iter, k, seed, log_scale):
    gen = torch.Generator().manual_seed(seed)
    mat = torch.randn(batch, rows, cols, dtype=torch.float64, generator=gen) * math.exp(log_scale)
    # Adversarial batches: near-ties, rank one, and one dominant matrix hidden at the end.
    if seed % 3 == 0:
        mat[-1] *= 1.001
    elif seed % 3 == 1:
        u = torch.randn(batch, rows, 1, dtype=torch.float64, generator=gen)
        mat = u @ torch.randn(batch, 1, cols, dtype=torch.float64, generator=gen)
    exact = exact_norm(mat).max()
    bound = max_matrix_spectral_norm(mat, n_iter, screen, k)
    assert bound >= exact * (1 - 1e-12)
    assert bound <= matrix_spectral_norm(mat, min(screen, n_iter)).max() * (1 + 1e-12)
    # On the CPU every screened bound above the refined maximum is refined too: within the
    # tolerance of n_iter steps on every matrix, whatever the candidates.
    assert bound <= matrix_spectral_norm(mat, n_iter).max() * (1 + gram.EXCEEDING_TOLERANCE + 1e-12)


def test_candidates_make_it_as_tight_as_full_iteration():
    mat = torch.randn(300, 32, 32, dtype=torch.float64)
    exact = exact_norm(mat).max()
    full = matrix_spectral_norm(mat, 10).max()
    screened = max_matrix_spectral_norm(mat, 10, 5, 8)
    assert screened == pytest.approx(full.item(), rel=1e-12)
    assert (screened / exact - 1) < 1e-6


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        matrix_spectral_norm(torch.randn(3), 2)
    with pytest.raises(ValueError, match="n_iter"):
        matrix_spectral_norm(torch.randn(3, 3), -1)
    with pytest.raises(TypeError):
        matrix_spectral_norm(torch.ones(3, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="batch"):
        max_matrix_spectral_norm(torch.randn(3, 3), 2)


def _flat_topped(batch: int, r: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Matrices whose singular values all lie within 5% of their largest, and whose largest
    are within 0.1% of each other: the spectra of a trained 1-Lipschitz convolution's
    frequencies, which training pushes up against the bound in every direction."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(batch, r, r, dtype=dtype, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(batch, r, r, dtype=dtype, generator=gen))[0]
    sv = 1 - 0.05 * torch.rand(batch, r, dtype=torch.float64, generator=gen)
    sv = sv * (1 - 1e-3 * torch.rand(batch, 1, dtype=torch.float64, generator=gen))
    return (u * sv[:, None, :].to(dtype)) @ v.mH


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32])
def test_screened_bounds_above_the_refined_maximum_are_refined(dtype):
    """Every screened bound of flat-topped matrices exceeds the candidates' maximum (3 steps
    leave each about 3% high); on the CPU those matrices are refined too, so the maximum is
    that of ``n_iter`` steps everywhere (within the tolerance), not of the screening."""
    mats = _flat_topped(40, 16, dtype)
    exact = torch.linalg.matrix_norm(mats.to(torch.complex128 if dtype.is_complex else torch.float64), 2).max()
    everywhere = matrix_spectral_norm(mats.double() if not dtype.is_complex else mats, 10).max()
    found = gram.max_gram_bound(mats, 10, 3, 4)
    assert exact * (1 - 1e-6) <= found.value <= everywhere * (1 + gram.EXCEEDING_TOLERANCE)
    assert int(found.steps) == 10
    with gram.refine_exceeding(False):
        assert gram.max_gram_bound(mats, 10, 3, 4).value > exact * 1.01  # what screening alone gives


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck_with_refined_exceeding_matrices(dtype):
    mats = _flat_topped(12, 5, dtype, seed=1).requires_grad_()
    found = gram.max_gram_bound(mats.detach(), 6, 2, 1)
    assert int((found.steps if found.steps.dim() else found.steps[None]).min()) == 6
    assert torch.autograd.gradcheck(lambda m: max_matrix_spectral_norm(m, 6, 2, 1), (mats,))


def test_refinement_of_exceeding_matrices_only_where_it_may_read_a_count():
    """A data-dependent count: on the CPU in eager mode, not on a GPU (a host synchronization)
    nor under torch.compile (one graph of fixed shapes)."""
    assert gram.refines_exceeding(torch.device("cpu"))
    assert not gram.refines_exceeding(torch.device("cuda", 0))
    assert not torch.compile(lambda x: x + gram.refines_exceeding(x.device), backend="eager", fullgraph=True)(
        torch.zeros(()))
    assert gram.bound_steps(40, 10, 5, 8) == (5, 7, 10)
    assert gram.bound_steps(40, 6, 5, 8) == (5, 6) and gram.bound_steps(16, 10, 5, 8) == (10,)


@pytest.mark.parametrize("screen,k", [(5, 8), (1, 1), (0, 2)])
def test_stacked_batches_each_get_their_own_screening_and_maximum(screen, k):
    """``(L, B, m, n)``: each batch's maximum as if it ran alone, even when one batch's
    matrices are all far larger than another's (a shared screening would refine none of the
    small batch's matrices)."""
    from lipnet.bounds.gram import bound_steps, max_gram_bound, max_gram_bound_grad

    gen = torch.Generator().manual_seed(3)
    mats = torch.randn(3, 40, 5, 7, dtype=torch.float64, generator=gen)
    mats[1] *= 1e3
    mats[2, 17] *= 4  # a clear maximiser
    stacked = max_gram_bound(mats, 9, screen, k)
    stops = bound_steps(40, 9, screen, k)
    grads = max_gram_bound_grad(stacked, 9, stops)
    for i in range(3):
        alone = max_gram_bound(mats[i], 9, screen, k)
        assert stacked.value[i] == alone.value and stacked.best[i] == alone.best
        assert stacked.steps[i] == alone.steps and stacked.trace_form[i] == alone.trace_form
        torch.testing.assert_close(grads[i], max_gram_bound_grad(alone, 9, stops), rtol=1e-12, atol=0)
        exact = torch.linalg.matrix_norm(mats[i], ord=2).max()
        assert stacked.value[i] >= exact * (1 - 1e-12)
    assert int(stacked.best[2]) == 17


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
@pytest.mark.parametrize("shape", [(1, 40, 90), (3, 12, 12)])
def test_backward_from_kept_iterates_equals_recomputing_them(scale, shape):
    """Small batches keep the forward's Gram iterates for the backward (no products of its own).
    In float32 its gradient is as accurate as the one recomputed from the normalized matrix
    (relative error in norm against float64 below 1e-3, both), also for large and small scales
    (exponents of thousands in the iterates' logarithms); zero matrices stay finite."""
    from lipnet.bounds.gram import max_gram_bound, max_gram_bound_grad

    torch.manual_seed(0)
    mat = scale * torch.randn(shape)
    kept = max_gram_bound(mat, 10, 5, 8, keep_iterates=True)
    assert kept.iterates is not None and kept.iterates.shape[0] == 10
    recomputed = kept._replace(iterates=None, iterate_log_scales=None)
    exact = max_gram_bound_grad(max_gram_bound(mat.double(), 10, 5, 8), 10, (10,))
    for found in (kept, recomputed):
        error = (max_gram_bound_grad(found, 10, (10,)).double() - exact).norm() / exact.norm()
        assert error < 1e-3
    exact_kept = max_gram_bound_grad(max_gram_bound(mat.double(), 10, 5, 8, keep_iterates=True), 10, (10,))
    torch.testing.assert_close(exact_kept, exact, rtol=1e-9, atol=1e-12)
    zero = torch.zeros(1, 4, 3, requires_grad=True)
    max_matrix_spectral_norm(zero, 6).backward()
    assert torch.isfinite(zero.grad).all() and not zero.grad.any()


def test_iterates_are_kept_only_where_arithmetic_dominates(monkeypatch):
    """An eager GPU bound of small matrices, where every operation is a launch, recomputes the
    iterates in its backward instead of keeping them."""
    import lipnet.bounds.gram as gram

    mat = torch.randn(1, 40, 90)
    assert gram.max_gram_bound(mat, 10, 5, 8, keep_iterates=True).iterates is not None
    monkeypatch.setattr(gram, "arithmetic_dominates", lambda batch, size, device: False)
    assert gram.max_gram_bound(mat, 10, 5, 8, keep_iterates=True).iterates is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("batch", [3, 40])  # 40: screening, then candidates
def test_forward_mode_derivative_is_the_reverse_one_and_a_finite_difference(dtype, batch):
    mat = torch.randn(batch, 5, 7, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tangent = torch.randn(mat.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    _, forward = torch.func.jvp(max_matrix_spectral_norm, (mat,), (tangent,))
    step = 1e-6
    central = (max_matrix_spectral_norm(mat + step * tangent) - max_matrix_spectral_norm(mat - step * tangent)) / (2 * step)
    torch.testing.assert_close(forward, central, rtol=1e-6, atol=1e-9)
    _, pullback = torch.func.vjp(max_matrix_spectral_norm, mat)
    (reverse,) = pullback(torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(forward, (reverse.conj() * tangent).real.sum() if dtype.is_complex
                               else (reverse * tangent).sum())
    if not dtype.is_complex:  # torch's jacfwd takes real inputs only
        torch.testing.assert_close(torch.func.jacfwd(max_matrix_spectral_norm)(mat),
                                   torch.func.jacrev(max_matrix_spectral_norm)(mat))



@pytest.mark.parametrize("slice_bytes, stepped", [(16 * 8 * 8 * 8 + 100, True), (3 * 8 * 8 * 8, False)])
def test_cpu_slices_of_the_batch_give_the_bound_of_the_whole_batch(monkeypatch, slice_bytes, stepped):
    """The CPU steps the real forms of many small matrices in slices (gram.CPU_SLICE_BYTES): the
    bounds and gradients are those of the batch stepped at once, whether the slices are used
    (16 matrices 8 x 8 each in float64, the last slice shorter) or too short to be (3 matrices)."""
    torch.manual_seed(0)
    mats = torch.randn(74, 8, 8, dtype=torch.complex128, requires_grad=True)
    kernel = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)

    def bounds():
        matrices = max_matrix_spectral_norm(mats, n_iter=9, screen_iter=4, n_candidates=3)
        conv = conv2d_spectral_norm(kernel, 16, padding=1, n_iter=9, screen_iter=4)
        return matrices.detach(), conv.detach(), *torch.autograd.grad(matrices.sum() + conv, (mats, kernel))

    whole = bounds()
    batches, step = [], gram._gram_steps_batch
    monkeypatch.setattr(gram, "CPU_SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(gram, "_gram_steps_batch", lambda g, *args: batches.append(len(g)) or step(g, *args))
    sliced = bounds()
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert max(batches) == (16 if stepped else 145)  # the screening of the conv's 145 frequencies


def _lowered_matmul_precision():
    """``torch.set_float32_matmul_precision("medium")``, and whether it lowers this machine's float32
    products (oneDNN's bfloat16 passes on CPUs with bfloat16 units; TF32 on a GPU)."""
    torch.set_float32_matmul_precision("medium")
    a = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(0))
    error = float((torch.bmm(a, a).double() - torch.bmm(a.double(), a.double())).abs().max())
    return error > 1e-3


def test_bounds_keep_full_float32_products_whatever_the_matmul_precision():
    """With bfloat16 passes (``"medium"``), a Gram bound of a 64 x 128 matrix fell 2e-4 below its
    norm; the bounds pin full float32 products and restore the caller's setting."""
    before = torch.get_float32_matmul_precision()
    try:
        if not _lowered_matmul_precision():
            pytest.skip("float32 products are not lowered on this machine")
        for seed in range(4):
            w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed))
            exact = float(torch.linalg.matrix_norm(w.double(), 2))
            assert float(max_matrix_spectral_norm(w[None])) >= exact * (1 - 1e-6)
            assert float(matrix_spectral_norm(w)) >= exact * (1 - 1e-6)
            k = torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(seed))
            dense = float(torch.linalg.matrix_norm(conv2d_operator_matrix(k.double(), 6, padding=1), 2))
            assert float(conv2d_spectral_norm(k, 6, padding=1)) >= dense * (1 - 1e-6)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
