"""How one spatial axis of ``F.conv2d`` embeds into a circular convolution.

A 2-D convolution acts separably on its two spatial axes, so its geometry (padding,
stride, dilation, input size) can be analysed one axis at a time. For each axis we find
a *circulant embedding*: integers such that, on that axis,

    y[i] = c[i mod N],     c[u] = sum_r sum_a W[a] * X_r[(u + b_a) mod N]   (r = r_a),

where ``X_r`` (``r < phases``) are the polyphase components of the input, ``N`` is the
FFT size and ``(r_a, b_a)`` the phase and circular shift of kernel tap ``a``. The operator
then factors as ``A = R C P`` with

* ``P``: the input placed into the phases -- an isometry for zero and circular padding;
  for reflect/replicate padding a copy operator with ``P^T P = diag(copies)``, so
  ``||P|| = sqrt(max copies)`` (``input_copies`` below);
* ``C``: a multi-channel circulant with ``phases * c_in`` input channels, whose singular
  values are those of the per-frequency symbol matrices (FFT of the tap layout);
* ``R``: a selection of circulant rows, each row used at most ``row_copies`` times, so
  ``||R|| = sqrt(row_copies)``.

Hence ``||A|| <= sqrt(row_copies * input_copies) * ||C||`` per axis, and the 2-D operator
is bounded by the product over both axes (Kronecker structure). The bound is *exact* when
``R`` and ``P`` are permutations (``exact`` below), e.g. circular 'same' convolutions.

Zero padding: the polyphase rewrite (space-to-depth) turns a stride-``s`` convolution into
a stride-1 convolution over ``s`` phases, which is what keeps strided bounds tight. The
FFT size is the smallest ``N`` for which nothing wraps around onto the input's support
(checked explicitly, tap by tap). For stride 1 and padding ``p < k`` this is usually ``N = n + p``
(the search also covers larger padding and inputs smaller than the kernel, where it differs);
``N = n`` (the FFT at the input size) is NOT sound once ``p > 0``.

References:
    Sedghi, Gupta, Long. "The Singular Values of Convolutional Layers", ICLR 2019
    (circulant spectrum). Delattre, Barthelemy, Araujo, Allauzen. "Spectral Norm of
    Convolutional Layers with Circular and Zero Paddings", 2024 (zero padding).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections import Counter
from dataclasses import dataclass

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


@dataclass(frozen=True)
class AxisEmbedding:
    """Circulant embedding of one spatial axis (see the module docstring)."""

    fft_size: int
    phases: int
    tap_phase: tuple[int, ...]
    tap_shift: tuple[int, ...]
    tap_live: tuple[bool, ...]
    row_copies: int
    input_copies: int
    exact: bool

    @property
    def norm_factor_squared(self) -> int:
        """``||R||^2 * ||P||^2`` for this axis."""
        return self.row_copies * self.input_copies


def output_length(n: int, kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (n + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=4096)
def axis_embedding(
    n: int,
    kernel: int,
    stride: int = 1,
    dilation: int = 1,
    pad_lo: int = 0,
    pad_hi: int = 0,
    padding_mode: str = "zeros",
) -> AxisEmbedding:
    """Circulant embedding of ``F.conv2d`` along one axis of an input of length ``n``.

    Args:
        n: input length along this axis (before padding).
        kernel: kernel length along this axis.
        stride, dilation: as in ``nn.Conv2d``.
        pad_lo, pad_hi: padding before and after the input (``F.pad`` order).
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.

    Raises:
        ValueError: for arguments PyTorch would reject (empty output, circular padding
            wider than the input, reflect padding not smaller than the input).
    """
    for name, value, low in (("input size", n, 1), ("kernel size", kernel, 1), ("stride", stride, 1),
                             ("dilation", dilation, 1), ("padding", pad_lo, 0), ("padding", pad_hi, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    m = output_length(n, kernel, stride, dilation, pad_lo, pad_hi)
    if m < 1:
        raise ValueError(
            f"input size {n} is too small for kernel {kernel} with dilation {dilation} and "
            f"padding ({pad_lo}, {pad_hi}): the convolution output would be empty"
        )
    if padding_mode == "circular":
        if max(pad_lo, pad_hi) > n:
            raise ValueError(f"circular padding ({pad_lo}, {pad_hi}) wraps around an input of size {n} more than once")
        circulant = _circular_embedding(n, kernel, stride, dilation, pad_lo, m)
        if circulant is not None:
            return circulant
        # Two taps read one sample (the kernel reaches around the input): bounded by its copies below.
    elif padding_mode == "zeros" or (pad_lo == 0 and pad_hi == 0):
        return _zero_padded_embedding(n, kernel, stride, dilation, pad_lo, m)
    # Padding that copies samples: the copies (``||P|| = sqrt(max copies)``), then the valid
    # convolution on the padded length, whose taps are distinct.
    copies = _padding_copies(n, pad_lo, pad_hi, padding_mode)
    valid = _zero_padded_embedding(n + pad_lo + pad_hi, kernel, stride, dilation, 0, m)
    return AxisEmbedding(valid.fft_size, valid.phases, valid.tap_phase, valid.tap_shift, valid.tap_live,
                         valid.row_copies, copies, exact=False)


def _circular_embedding(n: int, kernel: int, stride: int, dilation: int, pad_lo: int,
                        m: int) -> AxisEmbedding | None:
    """The circulant of a circular convolution, or ``None`` where two taps read one sample.

    That happens when the kernel reaches around the input. The circulant would add such taps
    into one entry of the symbol, where nearly cancelling taps lose their digits in floating
    point (``2^40 + 2^-20 - 2^40`` is 0), so a computed bound could be far below the operator's
    norm, and neither the bound's rounding margin (:mod:`lipnet.bounds.rounding`) nor the
    certification's rounding bound, which both take every entry to be one tap, would cover it.
    :func:`axis_embedding` then bounds the axis by its copies, as for reflect padding: sound, and
    loose by up to ``sqrt(copies)``, for inputs shorter than the kernel's reach only.
    """
    # y[i] = sum_a W[a] x[(s*i + d*a - pad_lo) mod n].
    offsets = [dilation * a - pad_lo for a in range(kernel)]
    if n % stride == 0:
        # Polyphase: X_r[q] = x[(s*q + r) mod n], q mod n/s; tap offset o = s*b + r.
        size = n // stride
        tap_phase = tuple(o % stride for o in offsets)
        tap_shift = tuple((o // stride) % size for o in offsets)
        rows = [i % size for i in range(m)]
        phases = stride
    else:
        # Stride does not divide n: rows s*i (mod n) of the stride-1 circulant.
        size = n
        tap_phase = (0,) * kernel
        tap_shift = tuple(o % n for o in offsets)
        rows = [(stride * i) % n for i in range(m)]
        phases = 1
    if len(set(zip(tap_phase, tap_shift))) < kernel:
        return None
    row_copies = max(Counter(rows).values())
    exact = m == size and row_copies == 1
    return AxisEmbedding(size, phases, tap_phase, tap_shift, (True,) * kernel, row_copies, 1, exact)


def _zero_padded_embedding(n: int, kernel: int, stride: int, dilation: int, pad_lo: int, m: int) -> AxisEmbedding:
    # Polyphase of the padded input: x_pad[s*q + r] = X_r[q]; tap offset d*a = s*b + r.
    # X_r is supported on S_r = {q : 0 <= s*q + r - pad_lo < n}.
    tap_phase = tuple((dilation * a) % stride for a in range(kernel))
    tap_block = tuple((dilation * a) // stride for a in range(kernel))
    supports = {}
    for r in set(tap_phase):
        lo = -((r - pad_lo) // stride)  # ceil((pad_lo - r) / s)
        hi = (n - 1 + pad_lo - r) // stride
        if lo <= hi:
            supports[r] = (lo, hi)
    # A tap that reads no input sample for any output multiplies zeros only: drop it.
    tap_live = tuple(r in supports and any(supports[r][0] <= i + b <= supports[r][1] for i in range(m))
                     for r, b in zip(tap_phase, tap_block))
    live_taps = {(r, b) for r, b, live in zip(tap_phase, tap_block, tap_live) if live}
    lower = max([m] + [hi - lo + 1 for lo, hi in supports.values()])
    upper = max([m + max(tap_block)] + [hi + 1 for _, hi in supports.values()])
    size = next(N for N in range(lower, upper + 1) if not _wraps_onto_support(N, m, live_taps, supports))
    tap_shift = tuple(b % size for b in tap_block)
    return AxisEmbedding(size, stride, tap_phase, tap_shift, tap_live, 1, 1, exact=False)


def _wraps_onto_support(size: int, m: int, taps, supports) -> bool:
    """Whether some tap reads, modulo ``size``, an input sample it must not see.

    Output ``i`` reads ``X_r[i + b]`` for each tap ``(r, b)``; reading index ``v`` outside
    ``S_r`` must give zero, so ``v mod size`` must avoid ``S_r mod size``.
    """
    for r, b in taps:
        lo, hi = supports[r]
        support = {q % size for q in range(lo, hi + 1)}
        for i in range(m):
            v = i + b
            if not lo <= v <= hi and v % size in support:
                return True
    return False


def _padding_copies(n: int, pad_lo: int, pad_hi: int, padding_mode: str) -> int:
    """Largest number of times an input sample appears in the reflect/replicate/circular-padded input."""
    if padding_mode == "reflect" and max(pad_lo, pad_hi) >= n:
        raise ValueError(f"reflect padding ({pad_lo}, {pad_hi}) must be smaller than the input size {n}")
    sources = []
    for j in range(-pad_lo, n + pad_hi):
        if padding_mode == "reflect":
            sources.append(-j if j < 0 else (2 * (n - 1) - j if j >= n else j))
        elif padding_mode == "circular":
            sources.append(j % n)
        else:
            sources.append(min(max(j, 0), n - 1))
    return max(Counter(sources).values())


def resolve_padding(padding, kernel_size: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]):
    """Per-axis ``(pad_lo, pad_hi)`` pairs exactly as ``nn.Conv2d`` computes them.

    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'`` (stride 1 only; an odd
    total puts the extra zero after the input, as PyTorch does).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    return ((ph, ph), (pw, pw))


def pair(value, name: str = "value") -> tuple[int, int]:
    """``int`` or pair -> pair of ints (like ``torch.nn.modules.utils._pair``); any integer type
    (``numpy.int64``, ...) counts, floats and bools do not (``F.conv2d`` refuses ``stride=True``);
    ``name`` says in the error what the value was."""
    if is_int(value):
        return (operator.index(value), operator.index(value))
    if isinstance(value, str) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be an int or a pair of ints (not bools), got {value!r}")
    value = tuple(value)
    if len(value) != 2 or not all(is_int(v) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints (not bools), got {value!r}")
    return tuple(operator.index(v) for v in value)


def is_int(value) -> bool:
    """Any integer type (``int``, ``numpy.int64``, ...) except ``bool``, as PyTorch's convolutions take them."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def axis_norm_factor(h: AxisEmbedding, w: AxisEmbedding) -> float:
    """``||R|| * ||P||`` for the 2-D operator (product over the two axes)."""
    return math.sqrt(h.norm_factor_squared * w.norm_factor_squared)


def distinct_frequencies(n_h: int, n_w: int) -> tuple[tuple[int, int], ...]:
    """One frequency ``(f_h, f_w)`` of each conjugate pair ``{f, -f mod N}`` of an ``N_h x N_w`` DFT.

    A real kernel's symbols satisfy ``K(-f) = conj(K(f))``, which has the same singular
    values, so the circulant's norm is the maximum over these frequencies alone. They are
    the half-plane ``0 <= f_w <= N_w // 2`` that ``rfft2`` keeps, less the conjugates it still
    holds twice: on the columns ``f_w = 0`` and ``f_w = N_w / 2`` (even ``N_w``), which are
    their own mirror images, only ``f_h <= N_h // 2`` is kept. That is ``ceil(N_h N_w / 2)``
    frequencies or one more (against ``N_h (N_w // 2 + 1)``): 13 instead of 15 for
    ``N = 5``, 545 instead of 561 for ``N = 33``. Row-major order.

    Example:
        >>> distinct_frequencies(3, 2)
        ((0, 0), (0, 1), (1, 0), (1, 1))
    """
    return tuple((f_h, f_w) for f_h in range(n_h) for f_w in range(n_w // 2 + 1)
                 if 0 < f_w < n_w - f_w or f_h <= n_h - f_h)
