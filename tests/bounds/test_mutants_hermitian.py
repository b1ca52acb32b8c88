"""Mutation tests of :mod:`lipnet.bounds.hermitian`: ``square_real_form`` writes its result and
``D = M - M^T`` into the buffers it is given, which a loop of squarings reuses."""

import torch

from lipnet.bounds.hermitian import hermitian_from_real_form, hermitian_real_form, square_real_form


def test_square_real_form_writes_the_square_and_d_into_the_given_buffers():
    """With ``out`` and ``work`` the result is ``out`` itself (same memory), holding the real form
    of ``G^2`` (checked against the complex square of ``G``), and ``work`` holds
    ``D = M - M^T`` exactly (one subtraction per entry)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 5, 5, dtype=torch.float64, generator=gen)
    out, work = torch.full_like(m, float("nan")), torch.full_like(m, float("nan"))
    result = square_real_form(m, out=out, work=work)
    assert result.data_ptr() == out.data_ptr()
    g = hermitian_from_real_form(m)
    torch.testing.assert_close(out, hermitian_real_form(g @ g), rtol=1e-13, atol=1e-13)
    assert torch.equal(work, m - m.mT)
