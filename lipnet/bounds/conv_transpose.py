"""Operator-norm bounds of transposed convolutions, through their adjoints.

``F.conv_transpose2d(y, W, stride=s, padding=p, output_padding=o, groups=g, dilation=d)``
on inputs of spatial size ``n`` is the adjoint of ``F.conv2d(x, W, stride=s, padding=p,
dilation=d, groups=g)`` on inputs of the transposed convolution's output size
``m = (n - 1) s - 2 p + d (k - 1) + o + 1``, followed by keeping its first ``n`` outputs:
``conv2d`` on size ``m`` has ``n + floor(o / s)`` outputs, exactly ``n`` when ``o < s``
(``output_padding`` may reach ``d - 1`` when the dilation exceeds the stride; the extra
outputs are then dropped). A matrix and its adjoint have the same operator norm, and dropping
outputs does not increase it, so the bound of that ``conv2d`` on size ``m`` is a bound of the
transposed convolution, equal to its norm up to the bound's own gap when ``o < s``.

Reference: Dumoulin and Visin, "A guide to convolution arithmetic for deep learning",
arXiv:1603.07285 (2016), section 4 (transposed convolution as the adjoint of the direct one).
"""

from __future__ import annotations

import torch

from lipnet.bounds.circulant import pair
from lipnet.bounds.conv import check_groups, conv2d_spectral_norm
from lipnet.bounds.gram import DEFAULT_N_CANDIDATES, DEFAULT_N_ITER, DEFAULT_SCREEN_ITER


def conv_transpose2d_output_size(input_size, kernel_size, *, stride=1, padding=0, output_padding=0,
                                 dilation=1) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of ``F.conv_transpose2d``'s output for inputs of ``input_size``.

    ``(n - 1) s - 2 p + d (k - 1) + o + 1`` on each axis; a ``ValueError`` for settings
    ``nn.ConvTranspose2d`` refuses (``output_padding`` not below the stride or the dilation,
    negative padding) or an empty output.

    Example:
        >>> conv_transpose2d_output_size(16, 3, stride=2, padding=1, output_padding=1)
        (32, 32)
    """
    sizes = []
    for axis, (n, k, s, p, o, d) in enumerate(zip(*(pair(value, name) for value, name in (
            (input_size, "input size"), (kernel_size, "kernel size"), (stride, "stride"), (padding, "padding"),
            (output_padding, "output_padding"), (dilation, "dilation"))))):
        if n < 1 or k < 1 or s < 1 or d < 1 or p < 0 or o < 0:
            raise ValueError(f"conv_transpose2d: axis {axis} has input size {n}, kernel {k}, stride {s}, dilation "
                             f"{d}, padding {p}, output_padding {o}; sizes, kernel, stride and dilation must be >= 1, "
                             "padding and output_padding >= 0")
        if o >= max(s, d):
            raise ValueError(f"conv_transpose2d: output_padding {o} on axis {axis} must be smaller than the stride "
                             f"({s}) or the dilation ({d}), as nn.ConvTranspose2d requires")
        size = (n - 1) * s - 2 * p + d * (k - 1) + o + 1
        if size < 1:
            raise ValueError(f"conv_transpose2d: inputs of size {n} on axis {axis} give an output of size {size} "
                             f"(padding {p} crops more than the kernel {k}, dilation {d} and stride {s} produce)")
        sizes.append(size)
    return sizes[0], sizes[1]


def conv_transpose2d_spectral_norm(
    weight: torch.Tensor,
    input_size,
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups: int = 1,
    n_iter: int = DEFAULT_N_ITER,
    screen_iter: int = DEFAULT_SCREEN_ITER,
    n_candidates: int = DEFAULT_N_CANDIDATES,
) -> torch.Tensor:
    """Upper bound on the operator norm of ``nn.ConvTranspose2d(...)(y)`` (without bias).

    The operator is exactly ``F.conv_transpose2d(y, weight, stride=stride, padding=padding,
    output_padding=output_padding, groups=groups, dilation=dilation)`` for inputs ``y`` of
    spatial size ``input_size``. Its norm is that of its adjoint, the convolution with the same
    weight on inputs of the output size (module docstring), which
    :func:`lipnet.bounds.conv2d_spectral_norm` bounds (zero padding: a sound FFT size,
    polyphase stride).

    Args:
        weight: kernel ``(c_in, c_out // groups, k_h, k_w)`` as ``nn.ConvTranspose2d`` stores it,
            real; or ``L`` such kernels stacked, ``(L, c_in, c_out // groups, k_h, k_w)``.
        input_size: spatial size ``n`` or ``(h, w)`` of the input.
        stride, padding, output_padding, dilation, groups: as in ``nn.ConvTranspose2d``.
        n_iter, screen_iter, n_candidates: as in :func:`lipnet.bounds.conv2d_spectral_norm`.

    Returns:
        0-dim tensor (``(L,)`` for stacked kernels), differentiable with respect to ``weight``.

    Example:
        >>> w = torch.randn(4, 8, 4, 4)
        >>> bound = conv_transpose2d_spectral_norm(w, 8, stride=2, padding=1)
        >>> y = torch.randn(1, 4, 8, 8)
        >>> out = torch.nn.functional.conv_transpose2d(y, w, stride=2, padding=1)
        >>> bool(out.norm() <= bound * y.norm())
        True
    """
    check_groups(groups, "conv_transpose2d")
    if weight.dim() in (4, 5) and weight.shape[-4] % groups:
        raise ValueError(f"conv_transpose2d: in_channels ({weight.shape[-4]}, the first dimension of a weight of shape "
                         f"{tuple(weight.shape[-4:])}) must be divisible by groups ({groups})")
    kernel_size = tuple(int(k) for k in weight.shape[-2:])
    output_size = conv_transpose2d_output_size(input_size, kernel_size, stride=stride, padding=padding,
                                               output_padding=output_padding, dilation=dilation)
    return conv2d_spectral_norm(weight, output_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                n_iter=n_iter, screen_iter=screen_iter, n_candidates=n_candidates)
