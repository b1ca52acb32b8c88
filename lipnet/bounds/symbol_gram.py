"""The Gram matrices of a convolution's symbols, from the kernel's autocorrelation.

With the circulant embedding of :mod:`lipnet.bounds.circulant`, the symbol at frequency
``f`` is ``K(f) = sum_t W_t e_t(f)``: tap ``t`` (a ``c_out x c_in`` matrix ``W_t``) placed
in the column block of its input phase with the twiddle ``exp(-i phi_t(f))``,
``phi_t(f) = 2 pi (f_h b_t,h / N_h + f_w b_t,w / N_w)``. Taps in different phases occupy
different columns, so

    K(f) K(f)^H = sum_{t, t' in one phase} W_t W_t'^T exp(-i (phi_t(f) - phi_t'(f)))
                = sum_d C_d exp(-i phi_d(f)),       C_d = sum_{b_t - b_t' = d} W_t W_t'^T:

the Gram matrix of every symbol is the DFT of the kernel's matrix autocorrelation over the
lags ``d`` (the multichannel Wiener-Khinchin relation), at most ``(2 k_h - 1)(2 k_w - 1)``
of them for a stride-1 ``k_h x k_w`` kernel. Its real form (:mod:`lipnet.bounds.hermitian`)
is real-linear in the ``C_d``:

    M_1(f) = sum_d (cos phi_d(f) - sin phi_d(f)) C_d.

Cost for ``T`` taps, ``F`` frequencies and ``c_out <= c_in``: ``2 T^2 c_out^2 c_in`` flops
for all tap products (one matrix product) and ``2 F D c_out^2`` for the ``D`` lags, against
``4 F c_out^2 c_in`` for the Gram products of ``F`` symbols (in real form), plus building and
rescaling the symbols themselves: cheaper whenever ``F > T^2``, i.e. for larger inputs.
This is the first Gram step taken on the kernel instead of on each symbol; the steps after
it are taken per frequency (:mod:`lipnet.bounds.gram`).

Rounding: the tap products have inner length ``c_in``, the lag sums and the final
combination a few dozen terms with coefficients of modulus ``<= sqrt(2)``, and
``sum_d ||C_d||_F <= T ||W||_F^2 <= T rank max_f sigma_max(K(f))^2`` (Parseval), so the
relative error of the largest ``M_1(f)`` is at most about
``sqrt(2) T rank (c_in + 2 T^2) u`` (:mod:`lipnet.bounds.rounding` allows for it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipnet.bounds.circulant import AxisEmbedding, distinct_frequencies


class SymbolLags(NamedTuple):
    """Constants of :func:`symbol_gram_real_form` for one embedding (``T`` taps, ``D`` lags,
    ``F`` frequencies of :func:`~lipnet.bounds.circulant.distinct_frequencies`)."""

    pairs: torch.Tensor  # (D, T * T): which tap pairs (t, t') sum into lag d (0 or 1)
    twiddles: torch.Tensor  # (F, D): cos phi_d(f) - sin phi_d(f)


def symbol_lags(height: AxisEmbedding, width: AxisEmbedding, dtype: torch.dtype,
                device: torch.device) -> SymbolLags:
    """The lags of a kernel's autocorrelation that the symbols' Gram matrices depend on.

    Taps are numbered ``t = a * k_w + b`` (row-major, as ``weight[..., a, b]``); a pair
    ``(t, t')`` contributes when both taps are live and share their input phase on both axes.
    """
    taps = [(a, b) for a in range(len(height.tap_phase)) for b in range(len(width.tap_phase))]
    lags: dict[tuple[int, int], int] = {}
    rows, columns = [], []
    for i, (a, b) in enumerate(taps):
        for j, (a2, b2) in enumerate(taps):
            if not (height.tap_live[a] and height.tap_live[a2] and width.tap_live[b] and width.tap_live[b2]):
                continue
            if height.tap_phase[a] != height.tap_phase[a2] or width.tap_phase[b] != width.tap_phase[b2]:
                continue
            lag = (height.tap_shift[a] - height.tap_shift[a2], width.tap_shift[b] - width.tap_shift[b2])
            rows.append(lags.setdefault(lag, len(lags)))
            columns.append(i * len(taps) + j)
    pairs = torch.zeros(len(lags), len(taps) ** 2, dtype=torch.float64, device=device)
    pairs[rows, columns] = 1
    n_h, n_w = height.fft_size, width.fft_size
    frequencies = torch.tensor(distinct_frequencies(n_h, n_w), dtype=torch.float64, device=device)
    f_h, f_w = frequencies[:, 0, None], frequencies[:, 1, None]
    d_h = torch.tensor([d for d, _ in lags], dtype=torch.float64, device=device)
    d_w = torch.tensor([d for _, d in lags], dtype=torch.float64, device=device)
    # Reduce f * d modulo N in integers before the angle, for accurate large products.
    turns = torch.remainder(f_h * d_h, n_h) / n_h + torch.remainder(f_w * d_w, n_w) / n_w
    angle = 2 * math.pi * turns
    twiddles = torch.cos(angle) - torch.sin(angle)
    return SymbolLags(pairs.to(dtype), twiddles.to(dtype))


def symbol_gram_real_form(weight: torch.Tensor, lags: SymbolLags, groups: int = 1) -> torch.Tensor:
    """Real forms of ``K(f) K(f)^H`` for every frequency of ``L`` stacked kernels.

    Args:
        weight: real kernels ``(L, c_out, c_in // groups, k_h, k_w)``.
        lags: from :func:`symbol_lags` for their embedding, in ``weight``'s dtype.
        groups: as in ``nn.Conv2d``; each group's symbols are a batch of their own.

    Returns:
        ``(L, groups * F, c_out // groups, c_out // groups)`` in the order of
        :func:`lipnet.bounds.conv.conv2d_symbol`'s ``(groups, F)``.
    """
    layers, c_out, c_in_g, k_h, k_w = weight.shape
    if not isinstance(groups, int) or groups < 1 or c_out % groups:
        raise ValueError(f"groups must be a positive int dividing out_channels ({c_out}), got {groups!r}")
    taps, out_g = k_h * k_w, c_out // groups
    # (L G, T o, i): tap t's matrix of each group as a block of rows
    stacked = weight.reshape(layers * groups, out_g, c_in_g, taps).permute(0, 3, 1, 2).reshape(
        layers * groups, taps * out_g, c_in_g)
    products = torch.bmm(stacked, stacked.mT)  # (L G, T o, T o): every W_t W_t'^T
    products = products.view(layers * groups, taps, out_g, taps, out_g).transpose(2, 3)
    lag_sums = lags.pairs @ products.reshape(layers * groups, taps * taps, out_g * out_g)  # (L G, D, o o)
    gram = lags.twiddles @ lag_sums  # (L G, F, o o)
    return gram.view(layers, groups * gram.shape[1], out_g, out_g)
