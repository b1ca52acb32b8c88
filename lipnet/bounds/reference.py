"""Reference values for testing and diagnostics: exact norms and power-iteration estimates.

These are not used for training or certification. ``exact_conv2d_spectral_norm`` is the
ground truth the bounds are tested against; ``conv2d_power_iteration`` converges to the
norm from below and is therefore only a lower bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipnet.bounds.circulant import pair, resolve_padding


def conv2d_apply(x, weight, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Apply the convolution exactly as ``nn.Conv2d`` does (without bias)."""
    if padding_mode == "zeros":
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)
    (top, bottom), (left, right) = resolve_padding(padding, weight.shape[-2:], pair(dilation), pair(stride))
    x = F.pad(x, (left, right, top, bottom), mode=padding_mode)
    return F.conv2d(x, weight, None, stride, 0, dilation, groups)


def affine_map_matrix(fn, shape, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The dense matrix of the linear part of an affine map, from its impulse responses, in float64.

    ``fn`` takes a batch of inputs of ``shape`` (without the batch dimension); it is applied in
    ``dtype`` to the ``n = prod(shape)`` unit inputs and to zero, and column ``j`` is the
    flattened response to the ``j``-th unit input minus the response to zero (which removes a
    bias). Size ``(outputs, n)``: small inputs only. Differentiable; wrap it in
    ``torch.no_grad()`` where no gradient is wanted.
    """
    n = math.prod(shape)
    impulses = torch.eye(n, dtype=dtype, device=device).reshape(n, *shape)
    zero = torch.zeros(1, *shape, dtype=dtype, device=device)
    return (fn(impulses).to(torch.float64) - fn(zero).to(torch.float64)).reshape(n, -1).T


def conv2d_operator_matrix(weight, input_size, **conv_kwargs) -> torch.Tensor:
    """The dense matrix of the convolution, built from impulse responses in float64.

    Column ``j`` is the flattened output for the ``j``-th unit input of shape
    ``(c_in, h, w)``. Size ``(c_out * h_out * w_out, c_in * h * w)``: small inputs only.
    """
    h, w = pair(input_size)
    weight = weight.detach().to(torch.float64)
    c_in = weight.shape[1] * conv_kwargs.get("groups", 1)
    return affine_map_matrix(lambda x: conv2d_apply(x, weight, **conv_kwargs), (c_in, h, w), device=weight.device)


def exact_conv2d_spectral_norm(weight, input_size, *, stride=1, padding=0, dilation=1, groups=1,
                               padding_mode="zeros") -> float:
    """The exact operator norm in float64.

    Circular stride-1 convolutions whose output has the input's size are circulant: their
    norm is computed from the FFT of the wrapped kernel and an SVD per frequency. Every
    other case builds the dense operator (:func:`conv2d_operator_matrix`) and takes its
    largest singular value, so keep the input small.
    """
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    weight = weight.detach().to(torch.float64)
    h, w = pair(input_size)
    # Let PyTorch reject what nn.Conv2d would reject, on every path.
    conv2d_apply(torch.zeros(1, weight.shape[1] * groups, h, w, dtype=torch.float64), weight, **kwargs)
    if padding_mode == "circular" and pair(stride) == (1, 1):
        pads = resolve_padding(padding, weight.shape[-2:], pair(dilation), (1, 1))
        k_eff = [d * (k - 1) for d, k in zip(pair(dilation), weight.shape[-2:])]
        if all(lo + hi == k for (lo, hi), k in zip(pads, k_eff)):
            return _circulant_norm(weight, (h, w), pair(dilation), groups)
    matrix = conv2d_operator_matrix(weight, input_size, **kwargs)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _circulant_norm(weight, size, dilation, groups) -> float:
    """Norm of the circular convolution with a (dilated) kernel wrapped onto ``size``."""
    c_out, c_in_g, k_h, k_w = weight.shape
    wrapped = torch.zeros(c_out, c_in_g, *size, dtype=torch.float64)
    for a in range(k_h):
        for b in range(k_w):
            wrapped[:, :, (dilation[0] * a) % size[0], (dilation[1] * b) % size[1]] += weight[:, :, a, b]
    symbol = torch.fft.fft2(wrapped)  # (c_out, c_in_g, h, w)
    symbol = symbol.reshape(groups, c_out // groups, c_in_g, -1).permute(0, 3, 1, 2)
    return float(torch.linalg.matrix_norm(symbol, ord=2).max())


def conv1d_apply(x, weight, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Apply the convolution exactly as ``nn.Conv1d`` does (without bias)."""
    if padding_mode == "zeros":
        return F.conv1d(x, weight, None, stride, padding, dilation, groups)
    single = (lambda v: v[0] if isinstance(v, (tuple, list)) else v)
    if padding == "valid":
        left = right = 0
    elif padding == "same":
        total = single(dilation) * (weight.shape[-1] - 1)
        left, right = total // 2, total - total // 2
    else:
        left = right = single(padding)
    return F.conv1d(F.pad(x, (left, right), mode=padding_mode), weight, None, stride, 0, dilation, groups)


def exact_conv1d_spectral_norm(weight, input_size: int, *, groups=1, **conv_kwargs) -> float:
    """The exact operator norm of ``nn.Conv1d`` on inputs of length ``input_size``, in float64:
    the largest singular value of the dense operator built from impulse responses."""
    weight = weight.detach().to(torch.float64)
    dim = weight.shape[1] * groups * input_size
    impulses = torch.eye(dim, dtype=torch.float64, device=weight.device).reshape(dim, -1, input_size)
    matrix = conv1d_apply(impulses, weight, groups=groups, **conv_kwargs).reshape(dim, -1).T
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def conv2d_power_iteration(weight, input_size, *, n_iter=100, generator=None, **conv_kwargs) -> float:
    """Power-iteration estimate of the norm: a LOWER bound, for diagnostics only.

    Runs power iteration on ``A^T A`` with the adjoint obtained by autograd, and returns
    ``||A v||`` for the final unit vector ``v`` (which never exceeds the true norm).
    """
    h, w = pair(input_size)
    groups = conv_kwargs.get("groups", 1)
    weight = weight.detach()
    c_in = weight.shape[1] * groups
    v = torch.randn(1, c_in, h, w, dtype=weight.dtype, device=weight.device, generator=generator)
    v = v / v.norm()
    for _ in range(n_iter):
        v.requires_grad_(True)
        out = conv2d_apply(v, weight, **conv_kwargs)
        (grad,) = torch.autograd.grad(0.5 * out.square().sum(), v)
        norm = grad.norm()
        if norm == 0:
            return 0.0
        v = (grad / norm).detach()
    with torch.no_grad():
        return float(conv2d_apply(v, weight, **conv_kwargs).norm())


def exact_conv_transpose2d_spectral_norm(weight, input_size, *, stride=1, padding=0, output_padding=0, dilation=1,
                                         groups=1) -> float:
    """The exact operator norm of ``nn.ConvTranspose2d`` (without bias) on inputs of spatial
    size ``input_size``, in float64: the largest singular value of the dense operator built
    from the impulse responses of ``F.conv_transpose2d`` (small inputs only)."""
    weight = weight.detach().to(torch.float64)
    h, w = pair(input_size)
    dim = weight.shape[0] * h * w
    impulses = torch.eye(dim, dtype=torch.float64, device=weight.device).reshape(dim, weight.shape[0], h, w)
    out = F.conv_transpose2d(impulses, weight, None, stride, padding, output_padding, groups, dilation)
    return float(torch.linalg.matrix_norm(out.reshape(dim, -1).T, ord=2))
