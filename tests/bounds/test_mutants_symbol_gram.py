"""Mutation tests of :mod:`lipnet.bounds.symbol_gram`: properties the other tests left open.

The twiddles ``cos phi_d(f) - sin phi_d(f)`` of :func:`symbol_lags` must be accurate to a few
ulps whatever the lag's size: a large dilation gives lags of hundreds of pixels, and an angle
``2 pi f d / N`` formed before reducing ``f d`` modulo ``N`` carries an absolute error
proportional to ``f d / N`` (hundreds of turns), which no rounding allowance of the bounds
accounts for.
"""

import mpmath
import torch

from lipnet.bounds import conv2d_embedding
from lipnet.bounds.circulant import distinct_frequencies
from lipnet.bounds.symbol_gram import symbol_lags


def test_twiddles_of_large_lags_are_accurate_to_a_few_ulps():
    """Every twiddle equals ``cos(2 pi t) - sin(2 pi t)``, ``t = f_h d_h / N_h + f_w d_w / N_w``,
    evaluated in 120-bit arithmetic, within ``1e-14`` (about 45 ulps of 1).

    Reduced modulo the FFT sizes, ``t`` is below 2 turns, so its angle is below ``4 pi`` and
    rounds by about ``1e-15``; the cosine and sine add a few ulps. Here ``f d / N`` reaches
    about 190 turns (dilations 97 and 131), and an unreduced angle errs by about ``4e-13``.
    The lag of each row of ``pairs`` is read off one of its tap pairs (taps row-major,
    ``t = a k_w + b``), independently of the order in which the lags were numbered."""
    mpmath.mp.prec = 120
    embedding = conv2d_embedding((3, 2), (230, 250), dilation=(97, 131), padding=0)
    height, width = embedding.height, embedding.width
    lags = symbol_lags(height, width, torch.float64, torch.device("cpu"))
    taps = [(a, b) for a in range(len(height.tap_shift)) for b in range(len(width.tap_shift))]
    lag_of_row = []
    for row in lags.pairs:
        first, second = divmod(int(row.nonzero()[0]), len(taps))
        (a, b), (a2, b2) = taps[first], taps[second]
        lag_of_row.append((height.tap_shift[a] - height.tap_shift[a2], width.tap_shift[b] - width.tap_shift[b2]))
    assert max(abs(d) for lag in lag_of_row for d in lag) >= 194
    frequencies = distinct_frequencies(height.fft_size, width.fft_size)
    worst = 0.0
    for index in range(0, len(frequencies), 199):
        f_h, f_w = frequencies[index]
        for row, (d_h, d_w) in enumerate(lag_of_row):
            angle = 2 * mpmath.pi * (mpmath.mpf(f_h * d_h) / height.fft_size + mpmath.mpf(f_w * d_w) / width.fft_size)
            exact = mpmath.cos(angle) - mpmath.sin(angle)
            worst = max(worst, abs(lags.twiddles[index, row].item() - float(exact)))
    assert worst <= 1e-14, worst
