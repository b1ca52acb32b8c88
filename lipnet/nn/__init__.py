"""1-Lipschitz layers."""

from lipnet.nn.activations import MaxMin, max_min
from lipnet.nn.gram_conv import GramConv2d
from lipnet.nn.gram_linear import GramLinear
from lipnet.nn.normalization import InputNormalization

__all__ = ["GramConv2d", "GramLinear", "InputNormalization", "MaxMin", "max_min"]
