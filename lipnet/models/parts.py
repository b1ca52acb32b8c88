"""Pieces shared by the architectures: input normalization + stem, and the fully connected head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipnet.nn import GramConv2d, GramLinear, InputNormalization, MaxMin


def input_layers(in_channels: int, width: int, *, mean: Sequence[float] | None, std: Sequence[float] | None,
                 stem_stride: int, n_iter: int, screen_iter: int) -> list[nn.Module]:
    """``[InputNormalization(mean, std), stem convolution, MaxMin]``.

    The stem is a 3x3 'same' convolution (``stem_stride=1``) or a 2x2 patchifying one
    (``stem_stride=2``, halving the resolution). ``None`` statistics mean 0 and 1.
    """
    if isinstance(stem_stride, bool) or stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
    check_count("in_channels", in_channels)
    check_count("width", width)
    mean = [0.0] * in_channels if mean is None else mean
    std = [1.0] * in_channels if std is None else std
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and "
                         f"{len(std)}")
    if stem_stride == 1:
        stem = GramConv2d(in_channels, width, 3, padding=1, n_iter=n_iter, screen_iter=screen_iter)
    else:
        stem = GramConv2d(in_channels, width, 2, stride=2, n_iter=n_iter, screen_iter=screen_iter)
    return [InputNormalization(mean, std), stem, MaxMin()]


def dense_head(features: int, dense: Sequence[int], num_classes: int, *, n_iter: int) -> list[nn.Module]:
    """``[Flatten, (GramLinear, MaxMin) per hidden width, GramLinear to the logits]``."""
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"the head needs >= 1 input features, got {features!r} (a width of 0 before it?)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (a margin compares two logits), got {num_classes!r}")
    for hidden in dense:
        check_count("dense width", hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in dense:
        layers += [GramLinear(features, hidden, n_iter=n_iter), MaxMin()]
        features = hidden
    layers.append(GramLinear(features, num_classes, n_iter=n_iter))
    return layers


def check_count(name: str, value, minimum: int = 1) -> None:
    """Refuse a size or a number of blocks that is not an integer ``>= minimum`` (a negative
    block count would build fewer layers, silently)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
