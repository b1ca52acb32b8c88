"""Hermitian matrices in real arithmetic: Gram products and squares at half the cost.

A Hermitian matrix ``G = X + iY`` has a symmetric real part ``X`` and an antisymmetric
imaginary part ``Y``. Its *real form* is the real matrix

    M = X + Y,    recovered by    X = (M + M^T) / 2,   Y = (M - M^T) / 2.

Symmetric and antisymmetric matrices are orthogonal in the Frobenius inner product, so
``||M||_F = ||G||_F``; the diagonal of ``M`` is that of ``G``, and the off-diagonal pairs
satisfy ``M_ij^2 + M_ji^2 = |G_ij|^2 + |G_ji|^2``. Every quantity a Gram bound reads off an
iterate (its Frobenius norm, trace, and the trace statistics of
:mod:`lipnet.bounds.gram`) is therefore the same when computed on ``M`` as on ``G``.

Products in the real form (``r x r`` iterates; a complex product costs ``8 r^3`` real flops):

* Gram matrix of a complex ``A = B + iC`` (``m x n``): ``A A^H`` has real form
  ``B B^T + C C^T + C B^T - B C^T = U V^T`` with ``U = [B, C]`` and ``V = [B - C, B + C]``,
  the real and imaginary parts of ``A`` and of ``(1 + i) A`` side by side: one real product
  with inner dimension ``2 n``, ``4 m^2 n`` flops instead of ``8 m^2 n``.
* Square of a Hermitian ``G``: ``G^2 = (X^2 - Y^2) + i (XY + YX)``, whose real form is
  ``X^2 - Y^2 + XY + YX = M M - 2 Y^2 = M M - D D / 2`` with ``D = M - M^T = 2Y``
  (``M M = X^2 + XY + YX + Y^2``): two real products, ``4 r^3`` flops instead of ``8 r^3``,
  and one elementwise operation (``D``).

Rounding: ``fl(M M)`` errs by at most ``gamma_r ||M||_F^2`` in Frobenius norm and
``fl(D D) / 2`` by at most ``gamma_r ||D||_F^2 / 2 <= 2 gamma_r ||M||_F^2``
(``||D||_F^2 = 4 ||Y||_F^2 <= 4 ||M||_F^2``), so a squaring in the real form errs by at most
about ``3 gamma_r ||G||_F^2``, the order of a complex product's error
(:mod:`lipnet.bounds.rounding` allows for it).
"""

from __future__ import annotations

import torch


def hermitian_real_form(g: torch.Tensor) -> torch.Tensor:
    """Real form ``Re(G) + Im(G)`` of Hermitian matrices ``g`` ``(..., r, r)``."""
    return g.real + g.imag


def hermitian_from_real_form(m: torch.Tensor) -> torch.Tensor:
    """The Hermitian matrices ``(M + M^T) / 2 + i (M - M^T) / 2`` whose real form is ``m``."""
    mt = m.mT
    return torch.complex((m + mt) / 2, (m - mt) / 2)


def gram_real_form(a: torch.Tensor) -> torch.Tensor:
    """Real form of the Gram matrix of complex ``a`` ``(..., m, n)`` on its smaller side:
    ``A A^H`` (``m <= n``) or ``A^H A``.

    ``A^H A = conj(A^T (A^T)^H)``, and conjugation transposes the real form, so the second
    case is the first one's for ``A^T``, transposed.
    """
    left = a.shape[-2] <= a.shape[-1]
    rows = a if left else a.mT
    u = torch.view_as_real(rows).flatten(-2)
    v = torch.view_as_real(rows * (1 + 1j)).flatten(-2)
    return u @ v.mT if left else v @ u.mT


def square_real_form(m: torch.Tensor, out: torch.Tensor | None = None,
                     work: torch.Tensor | None = None) -> torch.Tensor:
    """Real form of ``G^2`` from the real form ``m`` ``(B, r, r)`` of Hermitian ``G``:
    ``M M - D D / 2`` with ``D = M - M^T`` (module docstring).

    ``out`` and ``work`` (both of ``m``'s shape), buffers not overlapping ``m``, receive the
    result and ``D``: a loop of squarings can reuse its memory instead of allocating two fresh
    matrices per step (on the CPU, touching fresh pages costs about as much as the elementwise
    operation itself).
    """
    d = torch.sub(m, m.mT, out=work)  # the one elementwise operation, with a transposed (strided) operand
    return torch.bmm(m, m, out=out).baddbmm_(d, d, alpha=-0.5)
