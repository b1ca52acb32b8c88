"""Spectral-norm bounds for the exact operator that ``F.conv2d`` applies.

The convolution ``x -> F.conv2d(pad(x), W, stride, dilation, groups)`` on inputs of a
given spatial size is embedded, axis by axis, into a multi-channel circular convolution
(see :mod:`lipnet.bounds.circulant`). A circular convolution is block-diagonalised by the
2-D DFT, so its norm is the largest singular value among the per-frequency *symbol*
matrices ``K(f) = sum_{taps} W[:, :, a, b] exp(-2 pi i (f_h b_a / N_h + f_w b_b / N_w))``
(one column block per input phase). Each symbol is bounded by Gram iteration
(:func:`lipnet.bounds.gram.matrix_spectral_norm`), and

    ||conv|| <= sqrt(row_copies * input_copies) * max_f  gram_bound(K(f)),

with equality of the two sides (up to Gram convergence) for circular 'same' convolutions.
Groups give a block-diagonal operator: the maximum over groups is taken.

For real kernels ``K(-f) = conj(K(f))`` has the same singular values, so only the
half-plane of frequencies ``0 <= f_w <= N_w // 2`` is evaluated (as ``rfft2`` does), less the
conjugates that half-plane still holds twice (:func:`~lipnet.bounds.circulant.distinct_frequencies`).

References:
    Sedghi, Gupta, Long. "The Singular Values of Convolutional Layers", ICLR 2019.
    Delattre et al. "Efficient Bound of Lipschitz Constant for Convolutional Layers by
    Gram Iteration", ICML 2023. Delattre et al. "Spectral Norm of Convolutional Layers
    with Circular and Zero Paddings", 2024.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipnet.bounds.autocast import autocast_disabled, ieee_float32_matmuls
from lipnet.bounds.batching import vmap_into_stack
from lipnet.bounds.circulant import (
    AxisEmbedding,
    axis_embedding,
    distinct_frequencies,
    is_int,
    pair,
    resolve_padding,
)
from lipnet.bounds.gram import (
    DEFAULT_N_CANDIDATES,
    DEFAULT_N_ITER,
    DEFAULT_SCREEN_ITER,
    MaxBound,
    arithmetic_dominates,
    bound_steps,
    fake_tensor_mode_active,
    max_gram_bound,
    max_gram_bound_grad,
    max_gram_bound_of_grams,
    screening_steps,
)
from lipnet.bounds.first_order import first_order_backward
from lipnet.bounds.graphs import replayed
from lipnet.bounds.symbol_gram import SymbolLags, symbol_gram_real_form, symbol_lags


class ConvEmbedding(NamedTuple):
    """The circulant embeddings of both spatial axes of one convolution."""

    height: AxisEmbedding
    width: AxisEmbedding

    @property
    def norm_factor(self) -> float:
        """``||R|| * ||P||``: the bound is this factor times the circulant's norm."""
        return math.sqrt(self.height.norm_factor_squared * self.width.norm_factor_squared)

    @property
    def exact(self) -> bool:
        """Whether the operator norm equals the circulant's norm."""
        return self.height.exact and self.width.exact


def conv2d_embedding(
    kernel_size,
    input_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> ConvEmbedding:
    """Circulant embedding of a 2-D convolution (arguments as in ``nn.Conv2d``)."""
    kernel_size, input_size = pair(kernel_size, "kernel size"), pair(input_size, "input size")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    pads = resolve_padding(padding, kernel_size, dilation, stride)
    # The cache is for eager calls; a compiled graph computes the embedding once anyway
    # (and dynamo would warn that it ignores the cache wrapper).
    embed = axis_embedding.__wrapped__ if torch.compiler.is_compiling() else axis_embedding
    axes = [
        embed(n, k, s, d, lo, hi, padding_mode)
        for n, k, s, d, (lo, hi) in zip(input_size, kernel_size, stride, dilation, pads)
    ]
    return ConvEmbedding(*axes)


def check_groups(groups, operator_name: str) -> None:
    """A ``ValueError`` unless ``groups`` is an int >= 1, as ``F.conv2d`` requires (it refuses a bool)."""
    if not is_int(groups) or groups < 1:
        raise ValueError(f"{operator_name}: groups must be a positive int, got {groups!r}")


def conv2d_symbol(weight: torch.Tensor, embedding: ConvEmbedding, groups: int = 1) -> torch.Tensor:
    """Per-frequency symbol matrices of the circulant embedding of a convolution.

    Args:
        weight: real kernel of shape ``(c_out, c_in // groups, k_h, k_w)``.
        embedding: from :func:`conv2d_embedding`.
        groups: as in ``nn.Conv2d``.

    Returns:
        Complex tensor of shape ``(groups, F, c_out // groups, (c_in // groups) * s_h * s_w)``
        over the ``F`` frequencies of :func:`~lipnet.bounds.circulant.distinct_frequencies`
        (one of each conjugate pair, row-major).
    """
    check_groups(groups, "conv2d")
    k_h, k_w = weight.shape[-2:]
    h, w = embedding
    if len(h.tap_phase) != k_h or len(w.tap_phase) != k_w:
        raise ValueError(f"embedding was built for a {len(h.tap_phase)}x{len(w.tap_phase)} kernel, got {k_h}x{k_w}")
    return _symbol(weight[None], _tap_dft_for(embedding, weight), groups)[0]


def _tap_dft_for(embedding: ConvEmbedding, weight: torch.Tensor) -> torch.Tensor:
    complex_dtype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    return _tap_dft(embedding, dtype=complex_dtype, device=weight.device)


def _symbol(weight: torch.Tensor, dft: torch.Tensor, groups: int) -> torch.Tensor:
    """Symbols ``(L, groups, F, o, i R S)`` of ``L`` stacked kernels ``(L, c_out, c_in // groups, k_h, k_w)``,
    in one matrix product: kernels ``(L * c_out * c_in // groups, taps)`` times the tap DFT ``(taps, R S F)``."""
    layers, c_out, c_in_g, k_h, k_w = weight.shape
    if c_out % groups:
        raise ValueError(f"out_channels ({c_out}) must be divisible by groups ({groups})")
    _, r, s, f = dft.shape
    kernel = weight.reshape(layers * c_out * c_in_g, k_h * k_w).to(dft.dtype)
    if layers * groups * r * s == 1:
        # One kernel, one input phase: (F, taps) @ (taps, o i) is already one matrix per
        # frequency, with no permuted copy.
        symbol = torch.mm(dft.reshape(k_h * k_w, f).t(), kernel.t())
        return symbol.view(1, 1, f, c_out, c_in_g)
    symbol = torch.mm(kernel, dft.reshape(k_h * k_w, r * s * f)).view(layers, groups, c_out // groups, c_in_g, r, s, f)
    # contiguous: one matrix after another, the layout batched products want
    return symbol.permute(0, 1, 6, 2, 3, 4, 5).reshape(layers, groups, f, c_out // groups, c_in_g * r * s).contiguous()


def _taps_at(dft: torch.Tensor, index: torch.Tensor):
    """``(group, e)`` at one index ``group * F + frequency`` of each of ``L`` kernels (as in
    :func:`_symbol`'s flattened ``(groups, F)``): the group ``(L,)`` and the tap DFT at the
    frequency, ``e_tap(f)`` of shape ``(L, taps, R S)``; tensors throughout (no host
    synchronization)."""
    taps, r, s, f = dft.shape
    group, frequency = index // f, index % f
    return group, dft.index_select(3, frequency).permute(3, 0, 1, 2).reshape(index.shape[0], taps, r * s)


def _symbol_at(weight: torch.Tensor, dft: torch.Tensor, groups: int, index: torch.Tensor) -> torch.Tensor:
    """The symbol of each of ``L`` stacked kernels at one index each (see :func:`_taps_at`):
    ``(L, c_out // groups, c_in_g R S)``."""
    layers, c_out, c_in_g, k_h, k_w = weight.shape
    group, taps = _taps_at(dft, index)
    rows = torch.arange(layers, device=weight.device) * groups + group
    kernel = weight.reshape(layers * groups, (c_out // groups) * c_in_g, k_h * k_w).index_select(0, rows)
    return torch.bmm(kernel.to(dft.dtype), taps).view(layers, c_out // groups, -1)


def _uses_symbol_lags(embedding: ConvEmbedding, shape, groups: int, frequencies: int, screen: int,
                      device: torch.device) -> bool:
    """Whether the first Gram step comes from the kernel's autocorrelation
    (:mod:`lipnet.bounds.symbol_gram`) instead of from every symbol: when that step is taken
    (``screen >= 1``), on the output side (``c_out // groups <= c_in_g R S``, the smaller one),
    and when it is the cheaper way in arithmetic, ``F > T^2`` frequencies for ``T`` taps, where
    arithmetic sets the bound's time (:func:`lipnet.bounds.gram.arithmetic_dominates`: the
    CPU, compiled or replayed bounds, large eager ones). An eager GPU bound of small
    matrices waits on its launches instead, and the symbols' way takes about 25 fewer."""
    c_out, c_in_g, k_h, k_w = shape[-4:]
    layers = shape[0] if len(shape) == 5 else 1
    phases = embedding.height.phases * embedding.width.phases
    taps = k_h * k_w
    rows = c_out // groups
    return (screen >= 1 and rows <= c_in_g * phases and taps * taps < frequencies
            and arithmetic_dominates(layers * groups * frequencies, rows, device))


class _ConvSpectralBound(torch.autograd.Function):
    """``max_f gram_bound(K(f))`` of each of ``L`` stacked kernels' symbols, with a backward
    through the maximizing frequency alone: ``K(f)`` is linear in the kernel,
    ``K(f) = sum_taps W_tap e_tap(f)``, so the kernel's gradient is
    ``Re(sum conj(e_tap(f*)) dK)`` for the gradient ``dK`` of the one symbol the maximum
    depends on (no dense gradient over all frequencies). With ``lags`` (pairs and twiddles of
    :class:`~lipnet.bounds.symbol_gram.SymbolLags`) the first Gram iterates come from the
    kernel's autocorrelation, and only the maximizers' symbols are built.

    Outputs: the fields of :class:`~lipnet.bounds.gram.MaxBound` (the first, the bounds ``(L,)``,
    is the result; the others are what the backward needs, returned so that ``setup_context``
    can save them, as ``torch.func`` transforms require). ``keep``: a backward pass follows."""

    @staticmethod
    def forward(weight, dft, pairs, twiddles, groups, n_iter, screen_iter, n_candidates, keep):
        def bound(kernel):
            if twiddles is None:
                found = max_gram_bound(_symbol(kernel, dft, groups).flatten(1, 2), n_iter, screen_iter, n_candidates,
                                       keep_iterates=keep)
            else:
                # Entries of the scaled kernel are at most 1: its Gram matrices neither overflow nor
                # underflow where the maximum can be.
                scale = kernel.abs().amax(dim=(1, 2, 3, 4)).clamp_min(torch.finfo(kernel.dtype).tiny)
                gram = symbol_gram_real_form(kernel / scale.view(-1, 1, 1, 1, 1), SymbolLags(pairs, twiddles), groups)
                found = max_gram_bound_of_grams(gram, 2 * torch.log(scale.double())[:, None], n_iter, screen_iter,
                                                n_candidates, keep_iterates=keep)
                found = found._replace(matrix=_symbol_at(kernel, dft, groups, found.best))
            return tuple(field for field in found if field is not None)
        # The tap DFT and lags are constants of the graph: their addresses (kept alive by the
        # graph) are in the key.
        return replayed(bound, (weight,), lambda: ("conv bound", dft.data_ptr(), _address(twiddles), groups, n_iter,
                                                   screen_iter, n_candidates, keep))

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, dft, _, _, groups, n_iter, screen_iter, n_candidates, _ = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(weight, dft, *output)  # the weight only to tie a second derivative to it
        ctx.shape, ctx.groups, ctx.n_iter, ctx.dtype = weight.shape, groups, n_iter, weight.dtype
        ctx.stops = bound_steps(groups * dft.shape[-1], n_iter, screen_iter, n_candidates)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmap_into_stack(_ConvSpectralBound.apply, in_dims, *inputs)

    @staticmethod
    @first_order_backward("the Gram bound of a convolution")
    def backward(ctx, grad_output, *_):
        _, dft, *saved = ctx.saved_tensors
        settings = (tuple(ctx.shape), ctx.groups, ctx.n_iter, ctx.stops, ctx.dtype)

        def gradient(grad_output, *saved):
            return (_conv_bound_grad(MaxBound(*saved), grad_output, dft, *settings),)
        (grad,) = replayed(gradient, (grad_output, *saved), lambda: ("conv bound gradient", dft.data_ptr(), *settings))
        return grad, None, None, None, None, None, None, None, None


class _ConvSpectralBoundForwardMode(_ConvSpectralBound):
    """:class:`_ConvSpectralBound` with forward-mode derivatives (``torch.func.jvp``, ``jacfwd``,
    dual tensors); outside ``torch.compile``, which traces autograd functions only without one."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ConvSpectralBound.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], *output)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmap_into_stack(_ConvSpectralBoundForwardMode.apply, in_dims, *inputs)

    @staticmethod
    def jvp(ctx, weight_tangent, *_):
        """Each bound is a scalar: its tangent is its gradient (the backward's, through the
        maximizing frequency) against the kernel's tangent."""
        dft, *saved = ctx.saved_tensors
        grad = _conv_bound_grad(MaxBound(*saved), torch.ones_like(saved[0]), dft, tuple(ctx.shape), ctx.groups,
                                ctx.n_iter, ctx.stops, ctx.dtype)
        return (grad * weight_tangent).flatten(1).sum(1), *(None for _ in saved[1:])


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _conv_bound_grad(found: MaxBound, grad_output, dft, shape, groups, n_iter, stops, dtype):
    """Gradient of the stacked kernels ``shape`` from that of their bounds (``grad_output``, ``(L,)``)."""
    grad_symbol = max_gram_bound_grad(found, n_iter, stops) * grad_output[:, None, None]
    layers = shape[0]
    # The maximizing group of each kernel and e_tap(f*), (L, taps, R S).
    group, taps = _taps_at(dft, found.best)
    # (o i, R S) @ (R S, taps) per kernel: the sum over input phases of dK conj(e_tap(f*)).
    grad_kernel = torch.bmm(grad_symbol.reshape(layers, -1, taps.shape[2]), taps.mH).real
    size = grad_kernel.shape[1] * grad_kernel.shape[2]
    # Out of place: under vmap the gradient may be batched where the zeros are not.
    grad = torch.zeros(layers, groups, size, dtype=dtype, device=grad_kernel.device)
    grad = grad.scatter(1, group.view(layers, 1, 1).expand(layers, 1, size), grad_kernel.reshape(layers, 1, size).to(dtype))
    return grad.reshape(shape)


def conv2d_spectral_norm(
    weight: torch.Tensor,
    input_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    n_iter: int = DEFAULT_N_ITER,
    screen_iter: int = DEFAULT_SCREEN_ITER,
    n_candidates: int = DEFAULT_N_CANDIDATES,
) -> torch.Tensor:
    """Upper bound on the operator norm of ``nn.Conv2d(...)(x)`` (without bias).

    The operator is exactly ``F.conv2d(pad(x), weight, stride=stride, dilation=dilation,
    groups=groups)`` for inputs of spatial size ``input_size``, with ``pad`` as
    ``nn.Conv2d`` applies ``padding`` and ``padding_mode``. Every combination is sound:

    * ``'zeros'``: FFT size chosen so that nothing wraps onto the input (usually ``n + p`` for
      stride 1), stride handled by the polyphase rewrite of the kernel;
    * ``'circular'``: exact circulant spectrum when the output is a permutation of the
      circulant's (stride 1 'same', or stride dividing ``n`` with ``n / s`` outputs);
    * ``'reflect'``, ``'replicate'``: the padding copies input samples; the bound is the
      valid convolution's times ``sqrt`` of the largest copy count (sound, not tight).

    Args:
        weight: kernel ``(c_out, c_in // groups, k_h, k_w)``, real; or ``L`` such kernels
            stacked, ``(L, c_out, c_in // groups, k_h, k_w)``, bounded in one computation (the
            same few batched operations for all of them: on a GPU, where each operation is a
            kernel launch, ``L`` layers of one shape cost little more than one).
        input_size: spatial size ``n`` or ``(h, w)`` of the input.
        stride, padding, dilation, groups, padding_mode: as in ``nn.Conv2d``.
        n_iter: Gram iterations of the frequencies that may hold the maximum.
        screen_iter, n_candidates: every frequency gets ``screen_iter`` Gram steps and the
            ``n_candidates`` largest continue to ``n_iter``, on the CPU also those whose
            screened bound exceeds the candidates' maximum (see
            :func:`lipnet.bounds.gram.max_matrix_spectral_norm`); the result is an upper
            bound whatever these are.

    Returns:
        0-dim tensor (``(L,)`` for stacked kernels: one bound each), differentiable with
        respect to ``weight``. The bound is computed in
        float32 for half-precision weights and never under autocast.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> bound = conv2d_spectral_norm(w, 16, padding=1)
        >>> x = torch.randn(1, 4, 16, 16)
        >>> bool(torch.nn.functional.conv2d(x, w, padding=1).norm() <= bound * x.norm())
        True
    """
    stacked = weight.dim() == 5
    if weight.dim() not in (4, 5):
        raise ValueError("conv2d weight must have shape (c_out, c_in // groups, k_h, k_w), or (L, c_out, c_in // "
                         f"groups, k_h, k_w) for L stacked kernels, got {tuple(weight.shape)}")
    if weight.is_complex():
        raise TypeError("conv2d_spectral_norm expects a real kernel")
    check_groups(groups, "conv2d")
    embedding = conv2d_embedding(weight.shape[-2:], input_size, stride=stride, padding=padding,
                                 dilation=dilation, padding_mode=padding_mode)
    with autocast_disabled(weight.device.type), ieee_float32_matmuls():
        if weight.dtype not in (torch.float32, torch.float64):
            weight = weight.float()
        dft = _tap_dft_for(embedding, weight)
        frequencies = dft.shape[-1]
        screen = screening_steps(groups * frequencies, n_iter, screen_iter, n_candidates)
        lags = (None, None)
        if _uses_symbol_lags(embedding, weight.shape, groups, frequencies, screen, weight.device):
            lags = _symbol_lags_for(embedding, weight)
        factor = embedding.norm_factor
        del embedding  # not live across the autograd.Function call (torch 2.11's compiler cannot rebuild it)
        keep = torch.is_grad_enabled() and weight.requires_grad  # a backward pass may follow
        bound = _ConvSpectralBound if torch.compiler.is_compiling() else _ConvSpectralBoundForwardMode
        value = bound.apply(weight if stacked else weight[None], dft, *lags, groups, n_iter, screen_iter,
                            n_candidates, keep)[0]
        return factor * (value if stacked else value[0])


def conv1d_as_conv2d(stride=1, padding=0, dilation=1) -> dict:
    """``nn.Conv1d``'s geometry as ``nn.Conv2d`` arguments on inputs of height 1.

    ``F.conv1d(x, W, ...)`` equals ``F.conv2d(x[:, :, None], W[:, :, None], ...)[:, :, 0]`` with
    the height axis untouched: stride, dilation and padding 1, 1 and 0 there (a string padding
    keeps its meaning, which for a kernel of height 1 adds nothing on that axis).
    """
    padding = padding if isinstance(padding, str) else (0, _single(padding, "padding"))
    return dict(stride=(1, _single(stride, "stride")), padding=padding, dilation=(1, _single(dilation, "dilation")))


def conv1d_length(input_size) -> int:
    """The length ``n`` of a 1-D convolution's input, given as an int or a 1-tuple."""
    return _single(input_size, "input size (its length n)")


def _single(value, name: str) -> int:
    """An int or a 1-tuple of one (not a bool, which ``F.conv1d`` refuses) -> that int."""
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 1:
        (value,) = value
    if not is_int(value):
        raise ValueError(f"a 1-D convolution's {name} must be an int or a 1-tuple of one (not a bool), got {value!r}")
    return int(value)


def conv1d_spectral_norm(
    weight: torch.Tensor,
    input_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    n_iter: int = DEFAULT_N_ITER,
    screen_iter: int = DEFAULT_SCREEN_ITER,
    n_candidates: int = DEFAULT_N_CANDIDATES,
) -> torch.Tensor:
    """Upper bound on the operator norm of ``nn.Conv1d(...)(x)`` (without bias).

    A 1-D convolution is the 2-D convolution of its kernel on inputs of height 1
    (:func:`conv1d_as_conv2d`), so this is :func:`conv2d_spectral_norm` of that operator, with
    the same guarantees for every padding mode, stride, dilation and group count.

    Args:
        weight: kernel ``(c_out, c_in // groups, k)``, or ``L`` stacked kernels ``(L, c_out,
            c_in // groups, k)``.
        input_size: length ``n`` of the input (an int or a 1-tuple).
        stride, padding, dilation, groups, padding_mode: as in ``nn.Conv1d``.
        n_iter, screen_iter, n_candidates: as in :func:`conv2d_spectral_norm`.

    Example:
        >>> w = torch.randn(8, 4, 5)
        >>> bound = conv1d_spectral_norm(w, 64, padding=2)
        >>> x = torch.randn(1, 4, 64)
        >>> bool(torch.nn.functional.conv1d(x, w, padding=2).norm() <= bound * x.norm())
        True
    """
    if weight.dim() not in (3, 4):
        raise ValueError("conv1d weight must have shape (c_out, c_in // groups, k), or (L, c_out, c_in // groups, "
                         f"k) for L stacked kernels, got {tuple(weight.shape)}")
    return conv2d_spectral_norm(weight.unsqueeze(-2), (1, conv1d_length(input_size)), groups=groups,
                                padding_mode=padding_mode,
                                n_iter=n_iter, screen_iter=screen_iter, n_candidates=n_candidates,
                                **conv1d_as_conv2d(stride, padding, dilation))


def _symbol_lags_for(embedding: ConvEmbedding, weight: torch.Tensor) -> SymbolLags:
    return _cached_constant(("lags", embedding, weight.dtype, weight.device), weight.dtype, weight.device,
                            lambda device: symbol_lags(embedding.height, embedding.width, torch.float64, device))


_DFT_CACHE: dict = {}


def _tap_dft(embedding: ConvEmbedding, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``E[(a, b), r, s, (x, y)] = e_h[a, r, x] e_w[b, s, y]``: kernel taps to (input phase,
    frequency) of both axes, over one frequency ``(x, y)`` of each conjugate pair
    (:func:`lipnet.bounds.circulant.distinct_frequencies`)."""

    def build(device):
        e_h, e_w = _axis_dft(embedding.height, False, device), _axis_dft(embedding.width, True, device)
        (k_h, r, x), (k_w, s, y) = e_h.shape, e_w.shape
        grid = torch.einsum("arx,bsy->abrsxy", e_h, e_w).reshape(k_h * k_w, r, s, x * y)
        kept = [f_h * y + f_w for f_h, f_w in distinct_frequencies(x, embedding.width.fft_size)]
        return grid[..., kept]
    return _cached_constant((embedding, dtype, device), dtype, device, build)


def _cached_constant(key, dtype: torch.dtype, device: torch.device, build):
    """``build(device)`` (a tensor or a tuple of tensors, in float64 or complex128) in ``dtype``
    on ``device``, cached per ``key`` (not while compiling: a compiled graph computes it once
    anyway, and cache writes would break the graph).

    Only plain tensors are cached: built outside inference mode (an inference tensor cannot be
    saved for a later training step's backward), and not a fake tensor of ``FakeTensorMode`` or
    a ``torch.func`` transform's wrapper, which hold no values for later calls."""
    compiling = torch.compiler.is_compiling()
    # Under FakeTensorMode nothing is read from the cache either: its real tensors are foreign there.
    cached = None if compiling or fake_tensor_mode_active() else _DFT_CACHE.get(key)
    if cached is not None:
        return cached
    # Built on the CPU and cached; while compiling, built on the device itself, so that a
    # compiled CUDA graph holds no CPU work or host-to-device copy (CUDA graphs need that).
    with torch.inference_mode(False):
        built = build(device if compiling else torch.device("cpu"))
        value = (type(built)(*(part.to(device=device, dtype=dtype) for part in built)) if isinstance(built, tuple)
                 else built.to(device=device, dtype=dtype))
    if not compiling and all(_is_plain(part) for part in (value if isinstance(value, tuple) else (value,))):
        if len(_DFT_CACHE) > 256:
            _DFT_CACHE.clear()
        _DFT_CACHE[key] = value
    return value


def _is_plain(tensor: torch.Tensor) -> bool:
    return (type(tensor) is torch.Tensor and not tensor.is_inference()
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _axis_dft(axis: AxisEmbedding, half: bool, device: torch.device) -> torch.Tensor:
    """``e[a, r, f] = [r == r_a] exp(-2 pi i f b_a / N)`` (zero for dead taps), complex128."""
    n = axis.fft_size
    freqs = torch.arange(n // 2 + 1 if half else n, dtype=torch.float64, device=device)
    shifts = torch.tensor(axis.tap_shift, dtype=torch.float64, device=device)
    # Reduce f * b modulo N in integers before the angle, for accurate large products.
    angle = -2 * math.pi * torch.remainder(shifts[:, None] * freqs[None, :], n) / n
    phases = torch.arange(axis.phases, device=device)
    phase = (torch.tensor(axis.tap_phase, device=device)[:, None] == phases[None, :]).to(torch.float64)
    phase = phase * torch.tensor(axis.tap_live, dtype=torch.float64, device=device)[:, None]
    return phase[:, :, None] * torch.polar(torch.ones_like(angle), angle)[:, None, :]
