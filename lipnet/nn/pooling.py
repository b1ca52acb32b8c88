"""Pooling layers with proven L2 Lipschitz bounds.

All the pooling maps here act window by window, and on each window ``W`` they apply a
function ``phi`` that is 1-Lipschitz from ``(R^|W|, ||.||_2)`` to ``R``:

* L2-norm pooling ``phi(v) = ||v||_2`` (triangle inequality),
* scaled average pooling ``phi(v) = sum(v) / sqrt(|W|)`` (Cauchy-Schwarz),
* max pooling ``phi(v) = max(v)`` (``|max a - max b| <= max |a - b| <= ||a - b||_2``).

If every input sample lies in at most ``m`` windows, then for inputs ``a`` and ``b``

    ||pool(a) - pool(b)||^2 = sum_W |phi(a_W) - phi(b_W)|^2 <= sum_W ||a_W - b_W||^2
                            <= m ||a - b||^2,

so the pooling is ``sqrt(m)``-Lipschitz. Windows act separably on the two spatial axes, so
``m = m_h * m_w`` with the per-axis multiplicity of :func:`window_multiplicity`. For
non-overlapping windows (stride >= kernel size) ``m = 1``: the layer is 1-Lipschitz, and the
bound is attained by scaled average pooling on any input with a full window. Overlapping
windows are accepted with their honest bound ``sqrt(m) > 1`` (tight for scaled average
pooling on large inputs: the constant image gains a factor ``sqrt(m)``). Zero padding adds
zero entries to a window and changes none of this.

Reference:
    Anil, Lucas, Grosse. "Sorting out Lipschitz function approximation", ICML 2019, and
    Gouk et al. "Regularisation of neural networks by enforcing Lipschitz continuity",
    Machine Learning 2021 (Lipschitz constants of pooling layers).
"""

from __future__ import annotations

import math
import numbers
import operator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from lipnet.bounds.circulant import pair

#: Entries below this in a window's sum of squares are raised to it, so that L2-norm
#: pooling is ``max(||v||, sqrt(SQUARED_FLOOR))`` (still 1-Lipschitz per window) and its
#: gradient stays finite at zero.
SQUARED_FLOOR = 1e-24


def window_multiplicity(kernel: int, stride: int, dilation: int = 1) -> int:
    """Largest number of pooling windows along one axis that contain the same sample.

    Window ``o`` reads the (padded) positions ``o * stride + dilation * a``, ``0 <= a < kernel``,
    so the windows containing a position ``q`` are given by the taps ``a`` with
    ``dilation * a = q (mod stride)`` (then ``o`` is determined, distinct for distinct ``a``).
    With ``g = gcd(dilation, stride)`` these taps form one residue class modulo
    ``stride / g`` (or none), at most ``ceil(kernel * g / stride)`` of them; the class of
    ``a = 0`` attains it away from the borders. Independent of the input size, the padding
    and ``ceil_mode``.
    """
    for name, value in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    kernel, stride, dilation = map(operator.index, (kernel, stride, dilation))
    return -(-kernel * math.gcd(dilation, stride) // stride)


def pooling_lipschitz_bound(kernel_size, stride=None, dilation=1) -> float:
    """``sqrt(m_h * m_w)``, rounded up: the Lipschitz bound of 2-D window-wise pooling.

    Valid for L2-norm, scaled average and max pooling with any padding (see the module
    docstring). ``stride`` defaults to ``kernel_size`` as in ``nn.MaxPool2d``.
    """
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    m = math.prod(window_multiplicity(k, s, d) for k, s, d in zip(kernel_size, stride, dilation))
    return sqrt_up(m)


def adaptive_windows(n: int, out: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each window of adaptive pooling along one axis (PyTorch's rule).

    ``start = floor(o * n / out)`` and ``end = ceil((o + 1) * n / out)``.
    """
    if n < 1 or out < 1:
        raise ValueError(f"adaptive pooling needs input and output sizes >= 1, got {n} and {out}")
    return [((o * n) // out, -((-(o + 1) * n) // out)) for o in range(out)]


def adaptive_pooling_lipschitz_bound(input_size, output_size, average: bool) -> float:
    """Lipschitz bound of ``nn.AdaptiveAvgPool2d`` (``average=True``) or ``nn.AdaptiveMaxPool2d``.

    Max pooling: ``sqrt(m)`` as above. Average pooling divides window ``W`` by ``|W|``, which
    is ``1 / sqrt(|W|)`` times a 1-Lipschitz ``phi``, so the sum in the module docstring
    becomes ``sum_W ||a_W - b_W||^2 / |W| <= c ||a - b||^2`` with
    ``c = max_q sum_{W contains q} 1 / |W|``; ``c`` factors over the two axes (``|W|`` is
    the product of the axis lengths). Computed exactly with fractions, then rounded up.
    Global average pooling (``output_size=1``) gets ``1 / sqrt(h * w)``, its exact norm.
    """
    factor = Fraction(1)
    for n, out in zip(pair(input_size, "input size"), pair(output_size, "output_size")):
        weights = [Fraction(0)] * n
        for start, end in adaptive_windows(n, out):
            for q in range(start, end):
                weights[q] += Fraction(1, end - start) if average else 1
        factor *= max(weights)
    return sqrt_up(factor)


def sqrt_up(value: int | Fraction) -> float:
    """A float ``>= sqrt(value)`` (both roundings directed upwards)."""
    return math.nextafter(math.sqrt(math.nextafter(float(value), math.inf)), math.inf)


def l2_norm_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """L2 norm of every window: ``sqrt(sum_{i in W} x_i^2)`` (zero padding adds nothing).

    Computed in at least float32; a window sum of squares below :data:`SQUARED_FLOOR` is
    raised to it, so the gradient is finite (zero) for all-zero windows.
    """
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    work = x if x.dtype == torch.float64 else x.float()
    sums = F.avg_pool2d(work.square(), kernel_size, stride, padding) * math.prod(kernel_size)
    return sums.clamp_min(SQUARED_FLOOR).sqrt().to(x.dtype)


def float32_sqrt_down(n: int) -> float:
    """A float32 value ``<= sqrt(n)`` (the largest, for ``n`` below ``2^48``).

    Tensors of float32, float16 and bfloat16 multiply by a Python float rounded to float32
    (their arithmetic type), float64 ones by the float itself; this one every dtype applies
    exactly, so a layer scaled by it applies one multiplier, at most ``sqrt(n)``, in every
    dtype (and so does the float64 copy that certification evaluates). It is
    ``r = fl64(sqrt(n))`` with its significand cut to float32's 24 bits. That is not above
    ``sqrt(n)``: a cut below ``r`` is below ``sqrt(n)`` (``r`` is the float64 nearest to it),
    and an ``r`` with a 24-bit significand that is not ``sqrt(n)`` itself differs from it by
    more than half a float64 ulp (``|n - r^2| >= 2^-2k`` for ``r = a 2^-k``, ``a < 2^24``),
    so it would not have been the nearest.
    """
    mantissa, exponent = math.frexp(math.sqrt(n))
    return math.ldexp(math.floor(math.ldexp(mantissa, 24)), exponent - 24)


def scaled_avg_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """``s * sum_{i in W} x_i / (k_h * k_w)``: average pooling times ``s <= sqrt(k_h * k_w)``.

    ``s`` is :func:`float32_sqrt_down` of the window's area: ``sqrt(k_h * k_w)`` itself for
    square areas, otherwise less than a float32 ulp below it, and the same multiplier in every
    dtype. ``math.sqrt`` rounds up for some areas (``sqrt(2)`` in float64, ``sqrt(6)`` once
    rounded to float32), which made those windows' maps slightly more than 1-Lipschitz.
    """
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    return F.avg_pool2d(x, kernel_size, stride, padding) * float32_sqrt_down(math.prod(kernel_size))


class _WindowPool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        for k, p in zip(self.kernel_size, self.padding):
            if not 0 <= 2 * p <= k:
                raise ValueError(f"padding must be between 0 and half the kernel size, got padding "
                                 f"{self.padding} for kernel size {self.kernel_size}")
        pooling_lipschitz_bound(self.kernel_size, self.stride)  # validates

    def lipschitz_bound(self, input_size=None) -> float:
        """``sqrt(m)`` (1 for non-overlapping windows), for every input size."""
        return pooling_lipschitz_bound(self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class L2NormPool2d(_WindowPool2d):
    """L2-norm pooling (:func:`l2_norm_pool2d`): 1-Lipschitz for non-overlapping windows.

    Args:
        kernel_size: window size.
        stride: defaults to ``kernel_size`` (non-overlapping). A smaller stride gives
            overlapping windows and the Lipschitz bound ``sqrt(m)`` (see the module docstring).
        padding: zero padding, at most half the kernel size.

    Example:
        >>> pool = L2NormPool2d(2)
        >>> pool(torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])).item()
        5.0
        >>> pool.lipschitz_bound() <= 1 + 1e-15
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm_pool2d(x, self.kernel_size, self.stride, self.padding)


class ScaledAvgPool2d(_WindowPool2d):
    """Average pooling times ``sqrt(k_h * k_w)``, rounded down (:func:`scaled_avg_pool2d`).

    A ``k x k`` average pooling with stride ``k`` has operator norm ``1 / k``; the scaling
    makes it 1-Lipschitz (norm exactly 1), so it loses no margin in a 1-Lipschitz network.
    Arguments as in :class:`L2NormPool2d`.

    Example:
        >>> pool = ScaledAvgPool2d(2)
        >>> pool(torch.ones(1, 1, 2, 2)).item()
        2.0
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class GlobalL2NormPool2d(nn.Module):
    """Per-channel L2 norm over all spatial positions, output ``(N, C, 1, 1)``; 1-Lipschitz.

    Example:
        >>> GlobalL2NormPool2d()(torch.tensor([[[[3.0, 4.0]]]])).item()
        5.0
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm_pool2d(x, x.shape[-2:])

    def lipschitz_bound(self, input_size=None) -> float:
        """1: a single window per channel."""
        return 1.0


class GlobalScaledAvgPool2d(nn.Module):
    """Per-channel ``sum * s / (h * w)`` over all spatial positions, output ``(N, C, 1, 1)``,
    with ``s`` :func:`float32_sqrt_down` of ``h * w`` (``sqrt(h * w)`` to 2^-24).

    Global average pooling has norm ``1 / sqrt(h * w)``; this scaled form has norm
    ``s / sqrt(h * w) <= 1``, in every dtype.

    Example:
        >>> GlobalScaledAvgPool2d()(torch.ones(1, 1, 2, 2)).item()
        2.0
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        return F.avg_pool2d(x, size) * float32_sqrt_down(math.prod(size))

    def lipschitz_bound(self, input_size=None) -> float:
        """``1 + 2^-52``: a single window per channel, scaled by at most ``sqrt(h * w)``
        (:func:`float32_sqrt_down`)."""
        return math.nextafter(1.0, math.inf)
