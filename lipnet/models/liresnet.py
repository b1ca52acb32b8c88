"""A LiResNet-style 1-Lipschitz residual network: linear residual blocks ``I + conv`` and MaxMin."""

from __future__ import annotations

from collections.abc import Sequence

from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.models.init import orthogonal_init_
from lipnet.models.parts import check_count, dense_head, input_layers
from lipnet.models.registry import register_sizes
from lipnet.nn import GramConv2d, GramResidualConv2d, GramSequential, MaxMin


class LiResNet(GramSequential):
    """``normalize -> stem -> [I + conv, MaxMin] x depth -> neck -> flatten -> dense -> logits``.

    The residual blocks are :class:`lipnet.nn.GramResidualConv2d` (the convolution
    ``I + conv`` normalized by its own Gram bound, so the skip connection costs no
    Lipschitz slack) at constant width and resolution; their branch weights start at zero,
    so every block starts as the identity. The neck is a patchifying convolution
    (kernel = stride = ``neck_stride``) that shrinks the feature map before the fully
    connected head. The network is ``1 / min(std)``-Lipschitz from pixels to logits.

    Args:
        in_channels, num_classes, input_size, mean, std: of the data (as :class:`ConvNet`).
        width: channels of the residual trunk (even).
        depth: number of residual blocks.
        stem_stride: 1 for a 3x3 stem, 2 for a 2x2 patchifying stem.
        neck_stride: downsampling factor of the neck.
        neck_width: channels after the neck (default ``width``).
        dense: widths of the hidden fully connected layers.
        n_iter, screen_iter: Gram iterations of the training-time bounds (see :class:`lipnet.nn.GramConv2d`).

    Reference:
        Hu, Zhang, Fredrikson, Klamt. "Unlocking Deterministic Robustness Certification on
        ImageNet" (LiResNet), NeurIPS 2023.

    Example:
        >>> import torch
        >>> net = LiResNet(3, 10, 16, width=8, depth=2, neck_stride=4, dense=(32,))
        >>> net(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, input_size: int, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 width: int = 64, depth: int = 6, stem_stride: int = 1, neck_stride: int = 4,
                 neck_width: int | None = None, dense: Sequence[int] = (512,), n_iter: int = DEFAULT_N_ITER,
                 screen_iter: int = DEFAULT_SCREEN_ITER):
        neck_width = width if neck_width is None else neck_width
        check_count("depth", depth, minimum=0)
        if any(w % 2 for w in (width, neck_width, *dense)):
            raise ValueError(f"MaxMin needs even widths, got width={width}, neck_width={neck_width}, dense={dense}")
        layers = input_layers(in_channels, width, mean=mean, std=std, stem_stride=stem_stride, n_iter=n_iter,
                              screen_iter=screen_iter)
        if neck_stride < 1 or input_size % (stem_stride * neck_stride):
            raise ValueError(f"input_size {input_size} is not divisible by stem_stride * neck_stride "
                             f"= {stem_stride * neck_stride}")
        for _ in range(depth):
            layers += [GramResidualConv2d(width, 3, n_iter=n_iter, screen_iter=screen_iter), MaxMin()]
        layers += [GramConv2d(width, neck_width, neck_stride, stride=neck_stride, n_iter=n_iter, screen_iter=screen_iter),
                   MaxMin()]
        size = input_size // (stem_stride * neck_stride)
        layers += dense_head(neck_width * size * size, dense, num_classes, n_iter=n_iter)
        super().__init__(*layers)
        orthogonal_init_(self)


_SIZES = {
    "xs": dict(width=32, depth=4, stem_stride=2, neck_stride=2, dense=(256,)),
    "s": dict(width=64, depth=6, neck_stride=4, dense=(512,)),
    "m": dict(width=128, depth=12, neck_stride=4, dense=(1024,)),
    "l": dict(width=256, depth=18, neck_stride=4, dense=(2048,)),
}


register_sizes("liresnet", LiResNet, _SIZES)
