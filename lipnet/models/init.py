"""Orthogonal initialization of Gram layers, so that deep 1-Lipschitz stacks start norm-preserving."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.nn import GramResidualConv2d


@torch.no_grad()
def orthogonal_init_(module: nn.Module) -> nn.Module:
    """Initialize every ``nn.Conv2d`` / ``nn.Linear`` in ``module`` as an (semi-)orthogonal map.

    A spectrally normalized layer with a random weight shrinks most directions (its typical
    singular value is far below the largest), and a deep stack of such layers loses the
    signal. Orthogonal starting points avoid this:

    * ``nn.Linear``: ``nn.init.orthogonal_``;
    * patchifying convolutions (``kernel_size == stride``): the weight reshaped to
      ``(c_out, c_in * k_h * k_w)`` is orthogonal, so the map on each patch is;
    * residual convolutions (:class:`lipnet.nn.GramResidualConv2d`): the branch is zero, so
      the block starts as the identity;
    * other convolutions: the central tap is an orthogonal ``c_out x c_in`` matrix and the
      other taps are zero (a 1x1 orthogonal convolution, an isometry up to its shape);
    * grouped convolutions: the above for each group's block.

    Biases are set to zero. Returns ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, GramResidualConv2d):
            layer.weight.zero_()
        elif isinstance(layer, nn.Conv2d):
            patchify = tuple(layer.kernel_size) == tuple(layer.stride)
            if not patchify:
                layer.weight.zero_()
            # A grouped convolution is block diagonal: each group's block is made orthogonal.
            for weight in layer.weight.chunk(layer.groups):
                if patchify:
                    _orthogonal_(weight.view(weight.shape[0], -1))
                else:
                    _orthogonal_(weight[:, :, layer.kernel_size[0] // 2, layer.kernel_size[1] // 2])
        elif isinstance(layer, nn.Linear):
            _orthogonal_(layer.weight)
        else:
            continue
        if layer.bias is not None:
            layer.bias.zero_()
    return module


def _orthogonal_(matrix: torch.Tensor) -> None:
    """``nn.init.orthogonal_``, through float32 for half and bfloat16 (which its QR lacks)."""
    if matrix.dtype in (torch.float16, torch.bfloat16):
        matrix.copy_(nn.init.orthogonal_(torch.empty(matrix.shape, device=matrix.device)))
    else:
        nn.init.orthogonal_(matrix)
