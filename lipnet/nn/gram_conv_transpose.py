"""``GramConvTranspose2d``: a drop-in ``nn.ConvTranspose2d`` that is 1-Lipschitz by construction."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lipnet.bounds.circulant import is_int, pair
from lipnet.bounds.conv import conv2d_spectral_norm
from lipnet.bounds.conv_transpose import conv_transpose2d_output_size
from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.nn.normalized import GramNormalizedConv, snapshot


class OutputSize(NamedTuple):
    """The spatial output size ``(h, w)`` of a transposed convolution: what its bound depends on
    (:mod:`lipnet.bounds.conv_transpose`), and the key of its eval-mode cache."""

    h: int
    w: int


class GramConvTranspose2d(GramNormalizedConv, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose weight is divided by a Gram-iteration bound on its operator norm.

    Same constructor, attributes and ``state_dict`` keys as ``nn.ConvTranspose2d`` (it *is* an
    ``nn.ConvTranspose2d``), plus the keywords ``n_iter`` and ``screen_iter``. The transposed
    convolution is the adjoint of the convolution with the same weight on inputs of its output
    size, which has the same operator norm (:func:`lipnet.bounds.conv_transpose2d_spectral_norm`):
    each forward pass applies the weight divided by that convolution's bound
    (:func:`lipnet.bounds.conv2d_spectral_norm`) for the output size it produces, so the linear
    part is 1-Lipschitz in L2 on inputs of that size. ``forward(input, output_size)`` is
    supported as in ``nn.ConvTranspose2d``; the bound follows the output size it chooses.

    ``input_size`` in :meth:`lipschitz_bound`, :meth:`normalized_weight` and
    :meth:`weight_norm_bound` is the spatial size ``(h, w)`` of the layer's *input*, with the
    output padding of the layer (``output_padding``); ``None`` stands for the last forward's.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
        dilation, padding_mode, device, dtype: as in ``nn.ConvTranspose2d`` (which supports
            ``padding_mode='zeros'`` only).
        n_iter, screen_iter: as in :class:`lipnet.nn.GramConv2d`.

    Example:
        >>> up = GramConvTranspose2d(16, 8, 4, stride=2, padding=1)
        >>> up(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 8, 16, 16])
        >>> up.lipschitz_bound((8, 8)) <= 1 + 1e-5
        True

    Reference:
        Delattre et al., "Efficient Bound of Lipschitz Constant for Convolutional Layers by
        Gram Iteration", ICML 2023; the transposed convolution as an adjoint: Dumoulin and
        Visin, "A guide to convolution arithmetic for deep learning", 2016.
    """

    LIPSCHITZ_BOUND_DEPENDS_ON = (*GramNormalizedConv.LIPSCHITZ_BOUND_DEPENDS_ON, "_output_padding", "_output_size")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *,
                 n_iter: int = DEFAULT_N_ITER, screen_iter: int = DEFAULT_SCREEN_ITER):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._init_conv_normalization(n_iter, screen_iter)
        # Reject unsupported settings now rather than at the first batch: an input of 2p + 1
        # samples has a non-empty output whatever the kernel.
        if isinstance(padding, str) or not all(is_int(p) for p in self.padding):
            raise ValueError(f"{type(self).__name__}: padding must be an int or a pair of ints, got {padding!r} "
                             "(nn.ConvTranspose2d has no 'same' or 'valid' padding)")
        conv_transpose2d_output_size(tuple(2 * p + 1 for p in self.padding), self.kernel_size, stride=self.stride,
                                     padding=self.padding, output_padding=self.output_padding, dilation=self.dilation)

    def _geometry(self):
        return (*super()._geometry(), snapshot(self.output_padding))

    def _check_padding_unchanged(self) -> None:
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: padding_mode is {self.padding_mode!r}; transposed convolutions "
                             "support 'zeros' only (as nn.ConvTranspose2d)")

    def _output_size(self, input: torch.Tensor, output_size=None) -> tuple[OutputSize, list[int]]:
        """``(size, output_padding)``: the spatial output size of the forward on ``input`` (with
        ``output_size`` as ``nn.ConvTranspose2d.forward`` reads it) and the output padding it uses."""
        output_padding = list(self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                                   self.dilation))
        if len(output_padding) == 1:  # an int output_padding set after construction: torch expands (1,) alike
            output_padding *= 2
        size = conv_transpose2d_output_size(tuple(int(n) for n in input.shape[-2:]), self.kernel_size,
                                            stride=self.stride, padding=self.padding,
                                            output_padding=tuple(output_padding), dilation=self.dilation)
        return OutputSize(*size), output_padding

    def _input_size(self, input_size):
        if isinstance(input_size, OutputSize):
            return input_size
        if input_size is None:
            if self._last_input_size is None:
                raise ValueError(f"{type(self).__name__}: the bound depends on the input's spatial size; pass "
                                 "input_size=(h, w) or run a forward pass first")
            return self._last_input_size
        output_padding = self.output_padding
        if isinstance(output_padding, (tuple, list)) and len(output_padding) == 1:  # both axes, as in the forward
            output_padding = (output_padding[0],) * 2
        return OutputSize(*conv_transpose2d_output_size(input_size, self.kernel_size, stride=self.stride,
                                                        padding=self.padding, output_padding=output_padding,
                                                        dilation=self.dilation))

    def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
        # The adjoint: the convolution with this weight on inputs of the output size.
        self._check_padding_unchanged()
        return conv2d_spectral_norm(weight, self._input_size(input_size), stride=self.stride, padding=self.padding,
                                    dilation=self.dilation, groups=self.groups, n_iter=n_iter,
                                    screen_iter=n_iter if exhaustive else self.screen_iter)

    def _matrix_shape(self):
        stride_h, stride_w = pair(self.stride)  # also an int set after construction, as F.conv_transpose2d takes
        stride = stride_h * stride_w
        taps = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels // self.groups, self.out_channels // self.groups * stride, taps

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        self._check_input(input)
        self._check_padding_unchanged()
        size, _ = self._output_size(input, output_size)
        return self._forward_normalized(input, self.normalized_weight(size), output_size)

    def _forward_normalized(self, input: torch.Tensor, weight: torch.Tensor, output_size=None) -> torch.Tensor:
        """The transposed convolution with ``weight``, the normalized weight for the output size
        that ``output_size`` (as in ``forward``) gives."""
        size, output_padding = self._output_size(input, output_size)
        self._last_input_size = size
        return F.conv_transpose2d(input, weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)
