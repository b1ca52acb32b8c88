"""A plain 1-Lipschitz ConvNet: GramConv2d + MaxMin stages, strided downsampling, GramLinear head."""

from __future__ import annotations

from collections.abc import Sequence

from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.models.init import orthogonal_init_
from lipnet.models.parts import check_count, dense_head, input_layers
from lipnet.models.registry import register_sizes
from lipnet.nn import GramConv2d, GramSequential, MaxMin


class ConvNet(GramSequential):
    """``normalize -> stem -> [conv x depth, downsample] per stage -> flatten -> dense -> logits``.

    Every layer is a Gram layer or MaxMin, so the network is ``1 / min(std)``-Lipschitz from
    pixels to logits (the input normalization is inside the model, making certified radii
    radii in pixel space). Convolutions are 3x3 with zero 'same' padding; the stem and the
    downsampling between stages are patchifying convolutions (kernel = stride = 2) that
    halve the resolution; all weights start orthogonal (:func:`orthogonal_init_`).

    Args:
        in_channels, num_classes: of the data.
        input_size: height (= width) of the images; sets the flattened feature size.
        mean, std: per-channel input statistics (``None``: 0 and 1).
        widths: channels of each stage (even, for MaxMin).
        depths: 3x3 convolutions in each stage.
        dense: widths of the hidden fully connected layers.
        stem_stride: 1 for a 3x3 stem at full resolution, 2 for a 2x2 patchifying stem.
        n_iter, screen_iter: Gram iterations of the training-time bounds (see :class:`lipnet.nn.GramConv2d`).

    Example:
        >>> import torch
        >>> net = ConvNet(1, 10, 28, widths=(8, 16), depths=(1, 1), dense=(32,))
        >>> net(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, input_size: int, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 widths: Sequence[int] = (32, 64), depths: Sequence[int] = (1, 1), dense: Sequence[int] = (256,),
                 stem_stride: int = 2, n_iter: int = DEFAULT_N_ITER, screen_iter: int = DEFAULT_SCREEN_ITER):
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths and depths need one entry per stage, got {widths} and {depths}")
        for depth in depths:
            check_count("each of depths", depth, minimum=0)
        if any(w % 2 for w in (*widths, *dense)):
            raise ValueError(f"MaxMin needs even widths, got widths={widths}, dense={dense}")
        layers = input_layers(in_channels, widths[0], mean=mean, std=std, stem_stride=stem_stride, n_iter=n_iter,
                              screen_iter=screen_iter)
        size = input_size // stem_stride
        if size >> (len(widths) - 1) < 1 or input_size % (stem_stride << (len(widths) - 1)):
            raise ValueError(f"input_size {input_size} cannot be halved {len(widths) - 1} time(s) after a stem of "
                             f"stride {stem_stride}")
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for _ in range(depth):
                layers += [GramConv2d(width, width, 3, padding=1, n_iter=n_iter, screen_iter=screen_iter), MaxMin()]
            if stage + 1 < len(widths):
                layers += [GramConv2d(width, widths[stage + 1], 2, stride=2, n_iter=n_iter, screen_iter=screen_iter),
                           MaxMin()]
                size //= 2
        layers += dense_head(widths[-1] * size * size, dense, num_classes, n_iter=n_iter)
        super().__init__(*layers)
        orthogonal_init_(self)


_SIZES = {
    "xs": dict(widths=(16, 32), depths=(1, 1), dense=(128,), stem_stride=2),
    "s": dict(widths=(32, 64), depths=(1, 1), dense=(512,), stem_stride=2),
    "m": dict(widths=(32, 64, 128), depths=(2, 2, 2), dense=(512,), stem_stride=1),
    "l": dict(widths=(64, 128, 256), depths=(3, 3, 3), dense=(1024,), stem_stride=1),
}


register_sizes("convnet", ConvNet, _SIZES)
