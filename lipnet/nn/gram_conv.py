"""``GramConv2d``: a drop-in ``nn.Conv2d`` that is 1-Lipschitz by construction."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.bounds.circulant import pair, resolve_padding
from lipnet.bounds.conv import conv2d_embedding, conv2d_spectral_norm
from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.nn.normalized import GramNormalizedConv


class GramConv2d(GramNormalizedConv, nn.Conv2d):
    """``nn.Conv2d`` whose weight is divided by a Gram-iteration bound on its operator norm.

    Same constructor, attributes and ``state_dict`` keys as ``nn.Conv2d`` (it *is* an
    ``nn.Conv2d``), plus the keywords ``n_iter`` and ``screen_iter``. Each forward pass applies
    ``weight / conv2d_spectral_norm(weight, input_size, ...)`` for the spatial size of the
    input it receives, with the padding, padding mode, stride, dilation and groups of the
    layer, so the linear part is 1-Lipschitz in L2 on that input size. The gradient flows
    through the bound.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as in ``nn.Conv2d``. Reflect and replicate padding
            are supported with a sound but looser bound (the padding copies samples).
        n_iter: Gram iterations of the training-time bound.
        screen_iter: Gram iterations every frequency gets before the few that may hold the
            maximum continue to ``n_iter`` (:func:`lipnet.bounds.conv2d_spectral_norm`); the
            bound is sound whatever it is. On the CPU every frequency whose screened bound
            exceeds the candidates' maximum is refined too (as tight as ``n_iter`` steps
            everywhere); on a GPU or compiled, more screening is tighter for the flat spectra
            of trained and near-isometric kernels (``docs/benchmarks.md``), at about a sixth
            of the bound's time per step.

    Example:
        >>> conv = GramConv2d(3, 16, 3, padding=1)
        >>> y = conv(torch.randn(2, 3, 32, 32))
        >>> conv.lipschitz_bound((32, 32)) <= 1 + 1e-5
        True

    Reference:
        Delattre et al., "Efficient Bound of Lipschitz Constant for Convolutional Layers by
        Gram Iteration", ICML 2023.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, n_iter: int = DEFAULT_N_ITER,
                 screen_iter: int = DEFAULT_SCREEN_ITER):
        stride, padding, dilation = (_both_axes(value) for value in (stride, padding, dilation))
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_conv_normalization(n_iter, screen_iter)
        # Reject unsupported geometry now rather than at the first batch.
        conv2d_embedding(self.kernel_size, self._min_input_size(), stride=self.stride, padding=self.padding,
                         dilation=self.dilation, padding_mode=self.padding_mode)

    def _min_input_size(self) -> tuple[int, int]:
        pads = self._reversed_padding_repeated_twice
        sizes = []
        for axis, (k, d) in enumerate(zip(self.kernel_size, self.dilation)):
            lo, hi = pads[2 * (1 - axis)], pads[2 * (1 - axis) + 1]
            sizes.append(max(1, d * (k - 1) + 1 - lo - hi, lo, hi) + (1 if self.padding_mode == "reflect" else 0))
        return tuple(sizes)

    def _input_size(self, input_size):
        if input_size is None:
            input_size = self._last_input_size
            if input_size is None:
                raise ValueError(
                    f"{type(self).__name__}: the bound depends on the input's spatial size; pass input_size=(h, w) "
                    "or run a forward pass first"
                )
        return tuple(input_size) if not isinstance(input_size, int) else (input_size, input_size)

    def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
        self._check_padding_unchanged()
        return conv2d_spectral_norm(weight, self._input_size(input_size), stride=self.stride, padding=self.padding,
                                    dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode,
                                    n_iter=n_iter, screen_iter=n_iter if exhaustive else self.screen_iter)

    def _fixed_padding(self):
        (top, bottom), (left, right) = resolve_padding(self.padding, self.kernel_size, self.dilation, self.stride)
        return left, right, top, bottom

    def _matrix_shape(self):
        stride_h, stride_w = pair(_both_axes(self.stride))  # also an int set after construction, as F.conv2d takes
        stride = stride_h * stride_w
        taps = self.kernel_size[0] * self.kernel_size[1]
        return self.out_channels // self.groups, self.in_channels // self.groups * stride, taps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return self._forward_normalized(input, self.normalized_weight((int(input.shape[-2]), int(input.shape[-1]))))

    def _forward_normalized(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution with ``weight``, the normalized weight for this input's size."""
        self._last_input_size = (int(input.shape[-2]), int(input.shape[-1]))
        return self._conv_forward(input, weight, self.bias)


def _both_axes(value):
    """A one-element sequence of ``nn.Conv2d``'s stride, padding or dilation (which ``F.conv2d``
    applies to both axes) as a pair; anything else as it is."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return (value[0], value[0])
    return value
