"""``GramConv1d``: a drop-in ``nn.Conv1d`` that is 1-Lipschitz by construction."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.bounds.circulant import resolve_padding
from lipnet.bounds.conv import conv1d_as_conv2d, conv1d_length, conv1d_spectral_norm, conv2d_embedding
from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.nn.normalized import GramNormalizedConv


class GramConv1d(GramNormalizedConv, nn.Conv1d):
    """``nn.Conv1d`` whose weight is divided by a Gram-iteration bound on its operator norm.

    Same constructor, attributes and ``state_dict`` keys as ``nn.Conv1d`` (it *is* an
    ``nn.Conv1d``), plus the keywords ``n_iter`` and ``screen_iter``. Each forward pass applies
    ``weight / conv1d_spectral_norm(weight, n, ...)`` for the length ``n`` of the input it
    receives, with the padding, padding mode, stride, dilation and groups of the layer, so the
    linear part is 1-Lipschitz in L2 on inputs of that length (the bound is
    :class:`GramConv2d`'s for the same kernel on inputs of height 1).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as in ``nn.Conv1d``.
        n_iter, screen_iter: as in :class:`lipnet.nn.GramConv2d`.

    Example:
        >>> conv = GramConv1d(2, 8, 5, padding=2)
        >>> y = conv(torch.randn(4, 2, 100))
        >>> conv.lipschitz_bound(100) <= 1 + 1e-5
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, n_iter: int = DEFAULT_N_ITER,
                 screen_iter: int = DEFAULT_SCREEN_ITER):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_conv_normalization(n_iter, screen_iter)
        # Reject unsupported geometry now rather than at the first batch.
        conv2d_embedding((1, *self.kernel_size), (1, self._min_length()), padding_mode=self.padding_mode,
                         **self._as_conv2d())

    def _as_conv2d(self) -> dict:
        return conv1d_as_conv2d(self.stride, self.padding, self.dilation)

    def _min_length(self) -> int:
        lo, hi = self._reversed_padding_repeated_twice
        (k,), (d,) = self.kernel_size, self.dilation
        return max(1, d * (k - 1) + 1 - lo - hi, lo, hi) + (1 if self.padding_mode == "reflect" else 0)

    def _input_size(self, input_size):
        if input_size is None:
            input_size = self._last_input_size
            if input_size is None:
                raise ValueError(f"{type(self).__name__}: the bound depends on the input's length; pass "
                                 "input_size=n or run a forward pass first")
        return (conv1d_length(input_size),)

    def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
        self._check_padding_unchanged()
        return conv1d_spectral_norm(weight, self._input_size(input_size), stride=self.stride, padding=self.padding,
                                    dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode,
                                    n_iter=n_iter, screen_iter=n_iter if exhaustive else self.screen_iter)

    def _fixed_padding(self):
        geometry = self._as_conv2d()
        _, (left, right) = resolve_padding(geometry["padding"], (1, *self.kernel_size), geometry["dilation"],
                                           geometry["stride"])
        return left, right

    def _matrix_shape(self):
        (_, stride) = conv1d_as_conv2d(self.stride)["stride"]  # also an int set after construction, as F.conv1d takes
        return self.out_channels // self.groups, self.in_channels // self.groups * stride, self.kernel_size[0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return self._forward_normalized(input, self.normalized_weight((int(input.shape[-1]),)))

    def _forward_normalized(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution with ``weight``, the normalized weight for this input's length."""
        self._last_input_size = (int(input.shape[-1]),)
        return self._conv_forward(input, weight, self.bias)
