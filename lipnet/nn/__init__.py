"""1-Lipschitz layers."""

from lipnet.nn.activations import GroupSort, MaxMin, group_sort, max_min
from lipnet.nn.gram_conv import GramConv2d
from lipnet.nn.gram_conv1d import GramConv1d
from lipnet.nn.gram_conv_transpose import GramConvTranspose2d
from lipnet.nn.gram_linear import GramLinear
from lipnet.nn.normalization import InputNormalization
from lipnet.nn.pooling import GlobalL2NormPool2d, GlobalScaledAvgPool2d, L2NormPool2d, ScaledAvgPool2d
from lipnet.nn.residual import ConvexResidual, GramResidualConv2d
from lipnet.nn.sequential import GramSequential, stacked_normalized_weights

__all__ = [
    "ConvexResidual",
    "GlobalL2NormPool2d",
    "GlobalScaledAvgPool2d",
    "GramConv1d",
    "GramConv2d",
    "GramConvTranspose2d",
    "GramLinear",
    "GramResidualConv2d",
    "GramSequential",
    "GroupSort",
    "InputNormalization",
    "L2NormPool2d",
    "MaxMin",
    "ScaledAvgPool2d",
    "group_sort",
    "max_min",
    "stacked_normalized_weights",
]
