"""``GramLinear``: a drop-in ``nn.Linear`` that is 1-Lipschitz by construction."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.bounds.autocast import autocast_disabled
from lipnet.bounds.gram import DEFAULT_N_ITER, max_matrix_spectral_norm
from lipnet.nn.normalized import GramNormalized


class GramLinear(GramNormalized, nn.Linear):
    """``nn.Linear`` whose weight is divided by its Gram-iteration spectral-norm bound.

    Same constructor, attributes and ``state_dict`` keys as ``nn.Linear`` (it *is* an
    ``nn.Linear``), plus the keyword ``n_iter``. The forward pass applies
    ``weight / matrix_spectral_norm(weight)`` (with an explicit backward), so the layer is 1-Lipschitz in L2.

    Example:
        >>> fc = GramLinear(64, 10)
        >>> y = fc(torch.randn(5, 64))
        >>> fc.lipschitz_bound() <= 1 + 1e-5
        True
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 n_iter: int = DEFAULT_N_ITER):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_normalization(n_iter)

    def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
        with autocast_disabled(weight.device.type):
            if weight.dtype not in (torch.float32, torch.float64):
                weight = weight.float()
            return max_matrix_spectral_norm(weight[None], n_iter)

    def _matrix_shape(self):
        return self.out_features, self.in_features, 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._refuse_symbolic_tracing(input)
        return nn.functional.linear(input, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_iter={self.n_iter}"
