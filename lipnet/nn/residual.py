"""Residual blocks with sound Lipschitz bounds.

Two constructions:

* :class:`GramResidualConv2d` computes ``(x + conv(x)) / bound(I + conv)``. The identity is
  a convolution too: adding a centered delta kernel ``D`` to the weight gives a kernel
  ``W + D`` with ``F.conv2d(x, W + D) = x + F.conv2d(x, W)`` exactly (stride 1, 'same'
  padding, as many output as input channels). Its operator norm is bounded by
  :func:`lipnet.bounds.conv2d_spectral_norm` like any convolution, so the block is
  1-Lipschitz with no triangle-inequality slack (``||I + K||`` can be far below
  ``1 + ||K||``).
* :class:`ConvexResidual` computes ``(1 - alpha) x + alpha f(x)`` with ``alpha`` in
  ``[0, 1]``; it is ``(1 - alpha) + alpha * Lip(f)``-Lipschitz by the triangle inequality,
  so 1-Lipschitz whenever ``f`` is.

References:
    He et al. "Deep Residual Learning for Image Recognition", CVPR 2016. Meunier et al.
    "A Dynamical System Perspective for Lipschitz Neural Networks", ICML 2022 (convex
    combinations of 1-Lipschitz maps). Delattre et al., ICML 2023 (Gram bounds of convolutions).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipnet.bounds.circulant import pair
from lipnet.bounds.gram import DEFAULT_N_ITER, DEFAULT_SCREEN_ITER
from lipnet.nn.gram_conv import GramConv2d


def identity_kernel(channels: int, kernel_size, groups: int = 1, *, dtype=None, device=None) -> torch.Tensor:
    """The kernel ``D`` with ``F.conv2d(x, D, padding='same', groups=groups) == x``.

    Shape ``(channels, channels // groups, k_h, k_w)``: a one at the tap that 'same' padding
    aligns with the output position, ``((k_h - 1) // 2, (k_w - 1) // 2)`` (PyTorch puts the
    extra zero of an even kernel after the input), for the channel's own input.
    """
    k_h, k_w = pair(kernel_size, "kernel_size")
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k_h, k_w, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group, (k_h - 1) // 2, (k_w - 1) // 2] = 1
    return kernel


class GramResidualConv2d(GramConv2d):
    """``x -> (x + conv(x)) / bound(I + conv) + bias``: a 1-Lipschitz residual convolution.

    The layer stores the plain residual-branch kernel ``W`` as ``weight`` (``state_dict``
    keys as ``nn.Conv2d``) and applies the kernel ``(W + D) / bound(W + D)``, where ``D`` is
    :func:`identity_kernel` and ``bound`` the Gram bound of the convolution ``I + conv_W``
    on the input size seen. ``lipschitz_bound(input_size)`` certifies that operator in float64.

    Args:
        channels: input and output channels.
        kernel_size: int or pair; 'same' padding and stride 1 are implied.
        groups, bias, padding_mode, device, dtype: as in ``nn.Conv2d``.
        n_iter, screen_iter: Gram iterations of the training-time bound (as :class:`GramConv2d`).

    Example:
        >>> block = GramResidualConv2d(8, 3)
        >>> y = block(torch.randn(2, 8, 16, 16))
        >>> block.lipschitz_bound((16, 16)) <= 1 + 1e-5
        True
    """

    def __init__(self, channels, kernel_size, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None,
                 *, n_iter: int = DEFAULT_N_ITER, screen_iter: int = DEFAULT_SCREEN_ITER):
        super().__init__(channels, channels, kernel_size, stride=1, padding="same", groups=groups, bias=bias,
                         padding_mode=padding_mode, device=device, dtype=dtype, n_iter=n_iter, screen_iter=screen_iter)

    def _operator_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        self._check_weight_shape(weight)  # before the identity of the declared kernel size is added
        identity = identity_kernel(self.out_channels, self.kernel_size, self.groups,
                                   dtype=weight.dtype, device=weight.device)
        return weight + identity

    def extra_repr(self) -> str:
        return "residual, " + super().extra_repr()


class ConvexResidual(nn.Module):
    """``x -> (1 - alpha) x + alpha f(x)`` with ``alpha = sigmoid(alpha_logit)`` in ``(0, 1)``.

    Lipschitz constant at most ``(1 - alpha) + alpha * Lip(f)``; :mod:`lipnet.certify`
    composes it with the bound of ``f`` computed for the same input shape.

    Args:
        branch: a module mapping inputs to outputs of the same shape.
        alpha: initial mixing weight, strictly between 0 and 1.
        learnable: whether ``alpha`` is trained (stored as the logit ``alpha_logit``).
        device, dtype: of ``alpha_logit``, as for torch's layers; by default those of the
            branch's first floating-point parameter or buffer (so a branch built with
            ``dtype=torch.float64`` gives a float64 block), else torch's defaults.

    Example:
        >>> block = ConvexResidual(nn.Sequential(GramConv2d(4, 4, 3, padding=1), nn.ReLU()), alpha=0.25)
        >>> block(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(self, branch: nn.Module, alpha: float = 0.5, learnable: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"ConvexResidual: branch must be an nn.Module (lipnet.certify composes the bounds of its "
                            f"modules), got {type(branch).__name__}; wrap a function in a module of its own")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha}")
        self.branch = branch
        like = next((t for t in (*branch.parameters(), *branch.buffers()) if t.is_floating_point()), None)
        if like is not None:
            dtype = like.dtype if dtype is None else dtype
            device = like.device if device is None else device
        logit = torch.tensor(math.log(alpha / (1 - alpha)), device=device, dtype=dtype)
        if learnable:
            self.alpha_logit = nn.Parameter(logit)
        else:
            self.register_buffer("alpha_logit", logit)

    @property
    def alpha(self) -> float:
        """The mixing weight ``sigmoid(alpha_logit)``; setting it (strictly between 0 and 1) sets
        ``alpha_logit`` in place, so an optimizer holding it sees the change."""
        return float(torch.sigmoid(self.alpha_logit.detach()))

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0 < value < 1:
            raise ValueError(f"alpha must be strictly between 0 and 1, got {value}")
        with torch.no_grad():
            self.alpha_logit.fill_(math.log(value / (1 - value)))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - alpha, alpha)`` exactly as the forward pass applies them.

        Raises ``ValueError`` when ``alpha_logit`` is not one number: one mixing weight per
        channel or entry mixes each output coordinate differently, which is not a convex
        combination of the two maps (with ``alpha`` near 0 and 1 on two channels that the
        branch swaps, the block has norm about ``sqrt(2)``)."""
        logit = self.alpha_logit
        if logit.numel() != 1:
            raise ValueError(f"ConvexResidual: alpha_logit must hold one number, got shape {tuple(logit.shape)}; "
                             "a mixing weight per channel or entry is not a convex combination of x and f(x) "
                             "and can exceed the Lipschitz bound (1 - alpha) + alpha Lip(f). Use one ConvexResidual "
                             "per mixing weight, or set alpha_logit to a single value")
        alpha = torch.sigmoid(logit)
        return 1 - alpha, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if out.shape != x.shape:
            raise ValueError(f"ConvexResidual: the branch maps shape {tuple(x.shape)} to {tuple(out.shape)}; "
                             "it must preserve the shape")
        keep, alpha = self.coefficients()
        # Mixed in the widest of the dtypes, the coefficients exactly as held (cast down to bfloat16
        # activations, 1 - alpha and alpha could sum to 1 + 2^-9: another function than the one
        # certified), and the result in the activations' dtype.
        dtype = _widest(x.dtype, out.dtype)
        wide = _widest(dtype, keep.dtype)
        return (keep.to(wide) * x.to(wide) + alpha.to(wide) * out.to(wide)).to(dtype)

    def extra_repr(self) -> str:
        if self.alpha_logit.numel() != 1:  # refused by forward and the bound (coefficients); shown, not raised
            return f"alpha_logit of shape {tuple(self.alpha_logit.shape)}"
        return f"alpha={self.alpha:.4g}"


def _widest(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` of two floating dtypes, in Python (``torch.export`` would record a
    call of it as an operator): the wider, and float32 for bfloat16 with float16."""
    if a == b:
        return a
    if not (a.is_floating_point and b.is_floating_point):  # complex or integer values: torch's rule
        return torch.promote_types(a, b)
    bits_a, bits_b = torch.finfo(a).bits, torch.finfo(b).bits
    if bits_a == bits_b:
        return torch.float32
    return a if bits_a > bits_b else b
