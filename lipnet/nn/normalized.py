"""Shared machinery of the Gram-normalized layers: normalize, cache, certify.

A Gram-normalized layer applies ``W / bound(W)`` where ``bound`` is an upper bound on the
operator norm of the layer with weight ``W`` (for the input size actually seen), so the
layer is 1-Lipschitz by construction. Gradients flow through the bound.

In eval mode, when no gradient with respect to the weight is wanted, the normalized
weight is cached per input size and refreshed whenever the weight or what its bound depends
on changes (:meth:`GramNormalized._cache_key`), so inference computes no bound per batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from lipnet.bounds.circulant import is_int
from lipnet.bounds.first_order import error_on_backward
from lipnet.bounds.gram import DEFAULT_SCREEN_ITER, fake_tensor_mode_active, refines_exceeding
from lipnet.bounds.rounding import with_rounding_margin

#: Bounds below this are treated as this value: ``W / max(bound, TINY)`` keeps zero and
#: tiny weights finite and is still 1-Lipschitz (its norm is ``bound / max(bound, TINY)``).
TINY = 1e-12

#: The weight dtypes of Gram layers.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


# Fused optimizers (``fused=True``) update parameters without bumping their version counters;
# every optimizer step, fused or not, runs this global hook, which the cache key reads.
register_optimizer_step_post_hook(_count_optimizer_step)


def can_check_values(tensor: torch.Tensor) -> bool:
    """Whether the value of ``tensor`` can steer Python now (e.g. a check that a bound is
    finite): not while ``torch.compile`` traces, nor for a tensor batched by ``torch.func.vmap``
    at some level (a check of each copy would be data-dependent control flow), nor on the meta
    device or under ``FakeTensorMode`` (no values: shape and memory estimators run models so)."""
    if torch.compiler.is_compiling() or tensor.is_meta or isinstance(tensor, FakeTensor):
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return False
        tensor = functorch.get_unwrapped(tensor)
    return True


def unusable_bounds(bounds: torch.Tensor, tracked) -> torch.Tensor:
    """Where a training bound needs attention: not finite (NaN or inf in the weight, or
    overflow: an error), or zero where ``tracked`` (a gradient with respect to the weight may
    be asked for, and ``W / ||W||`` has no derivative at 0: :func:`refuse_weight_gradient`).
    ``tracked``: a bool, or a bool tensor of the shape of ``bounds``. One host synchronization
    reads the result."""
    unusable = ~torch.isfinite(bounds)
    if torch.is_grad_enabled():
        tracked = torch.as_tensor(tracked, device=bounds.device)
        unusable = unusable | ((bounds == 0) & tracked)
    return unusable


def finite_quotient_divisor(bound: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``max(bound, TINY, max|W| / (M / 2))`` in ``dtype``, ``M`` the largest finite value of
    ``weight``'s dtype: ``weight`` divided by it stays finite in that dtype even where the bound
    is 0 (:meth:`GramNormalized._divide`). ``bound`` is 0-dim for one weight, ``(L,)`` for a
    stack ``(L, ...)`` of weights (one divisor each)."""
    divisor = bound.clamp_min(TINY).to(dtype)
    if weight.numel() == 0:
        return divisor
    peak = weight.detach().abs().flatten(bound.dim()).amax(-1).to(dtype)
    return torch.maximum(divisor, peak / (torch.finfo(weight.dtype).max / 2))


def refuse_weight_gradient(normalized: torch.Tensor, layer) -> torch.Tensor:
    """``normalized`` (the normalized weight of a layer whose operator is zero: bound 0), whose
    gradient raises a clear ``ValueError`` when asked for. The forward (the zero map) and
    gradients with respect to the input are unaffected; the derivative of ``W / ||W||`` at 0
    does not exist (the clamp of the bound would make it about 1e12 times the incoming one)."""
    name = type(layer).__name__
    return error_on_backward(normalized, ValueError(
        f"{name}: the weight is zero as an operator (its bound is 0: an all-zero weight, taps that read only zero "
        "padding on this input size, or a residual kernel that cancels the identity), so the normalized weight "
        "W / ||W|| has no direction and no derivative, and a gradient with respect to it was asked for (it would be "
        "about 1e12 times the incoming one). Initialize the weight with nonzero values (e.g. reset_parameters()); "
        "a residual branch that starts as the identity is GramResidualConv2d with a zero weight. Forward passes and "
        "gradients with respect to the input work: the layer is the zero map."))


def snapshot(value):
    """``value`` as the cache key keeps it: a list (torch's convolutions take ``conv.stride = [2, 2]``)
    as a tuple, so that editing the list in place later is a change of the key."""
    return tuple(value) if isinstance(value, list) else value


#: Gram iterations of the float64 certification bound.
CERTIFICATION_N_ITER = 14


class GramNormalized:
    """Mixin for modules with a ``weight`` normalized by a Gram-iteration bound.

    Subclasses implement :meth:`_operator_norm` and :meth:`_matrix_shape`, and may override
    :meth:`_operator_weight` to normalize a weight derived from the parameter.
    """

    n_iter: int
    #: Methods the certified bound relies on: a subclass overriding one must define its own
    #: ``lipschitz_bound`` (``lipnet.certify`` refuses the inherited one). Overriding
    #: ``_operator_weight`` or ``normalized_weight`` is fine: the bound is computed on the weight
    #: that ``normalized_weight`` returns, which is the one the forward applies.
    LIPSCHITZ_BOUND_DEPENDS_ON: tuple[str, ...] = ("_operator_norm", "_matrix_shape")
    #: Raise if the bound is not finite, and refuse the weight gradient of an all-zero weight
    #: (:func:`unusable_bounds`; costs a host sync per forward on accelerators).
    check_finite: bool = True

    def _operator_norm(self, weight: torch.Tensor, input_size, n_iter: int, exhaustive: bool = False) -> torch.Tensor:
        """Bound of the operator with kernel ``weight``; ``exhaustive``: all ``n_iter`` steps on
        every frequency (no screening), for certification."""
        raise NotImplementedError

    def _matrix_shape(self) -> tuple[int, int, int]:
        """``(rows, cols, taps)`` of the matrices whose norms are bounded."""
        raise NotImplementedError

    def _operator_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight whose operator is bounded and normalized (``self.weight`` by default), from
        ``weight``, a read of ``self.weight`` already made (a parametrization computes the weight anew
        at each read: one read per forward, as torch's layers make), or ``None`` to read it."""
        return self.weight if weight is None else weight

    def _geometry(self) -> tuple:
        """The layer's settings besides the weight that its bound and forward read (stride,
        padding, ... of a convolution; none by default), part of the eval cache's key."""
        return ()

    def _init_normalization(self, n_iter: int) -> None:
        if not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        self.n_iter = n_iter
        self._eval_cache: dict = {}
        self._refuse_unsupported_dtype()

    def _refuse_unsupported_dtype(self, weight: torch.Tensor | None = None) -> None:
        """Raise ``TypeError`` for a weight (``weight``, or ``self.weight`` read now) of a dtype
        other than :data:`SUPPORTED_DTYPES`: the bounds are for real operators, and the weight
        a half-precision layer applies is rounded so that its bound stays <= 1 (:meth:`_divide`),
        which float8's 3 or 2 mantissa bits leave no room for."""
        dtype = (self.weight if weight is None else weight).dtype
        if dtype in SUPPORTED_DTYPES:
            return
        why = ("the Gram bound and its certificate are for real operators (a complex weight's imaginary part "
               "would be dropped)" if dtype.is_complex else "its normalized weight is not computed in that dtype")
        raise TypeError(f"{type(self).__name__}: weights of dtype {dtype} are not supported: {why}. Use float32, "
                        "float64, bfloat16 or float16")

    def _declared_weight_shape(self) -> tuple[int, ...] | None:
        """The weight shape that the layer's settings describe (channels, features, kernel size),
        which its bound reads besides the weight; ``None`` for a layer without such settings."""
        if isinstance(self, nn.modules.conv._ConvNd):
            name, groups, kernel_size = type(self).__name__, self.groups, self.kernel_size
            if not is_int(groups) or groups < 1:
                raise ValueError(f"{name}: groups must be an integer >= 1, got {groups!r}")
            dims = len(self._reversed_padding_repeated_twice) // 2
            if (not isinstance(kernel_size, (tuple, list)) or len(kernel_size) != dims
                    or not all(is_int(k) for k in kernel_size)):
                raise ValueError(f"{name}: kernel_size must be a tuple of {dims} ints, as the constructor stores it "
                                 f"(its bound and forward read it per axis), got {kernel_size!r}")
            rows, cols = ((self.in_channels, self.out_channels) if self.transposed
                          else (self.out_channels, self.in_channels))
            return (rows, cols // groups, *kernel_size)
        if isinstance(self, nn.Linear):
            return (self.out_features, self.in_features)
        return None

    def _check_weight_shape(self, weight: torch.Tensor) -> None:
        """Refuse a weight whose shape the layer's settings do not describe: the bound reads
        both (a transposed convolution's output size from ``kernel_size``, the rounding margins
        from the channel counts), so a weight replaced by one of another kernel size or channel
        count would be bounded as a different operator than the forward applies."""
        expected = self._declared_weight_shape()
        if expected is not None and tuple(weight.shape) != tuple(expected):
            raise ValueError(f"{type(self).__name__}: the weight has shape {tuple(weight.shape)}, but the layer's "
                             f"settings (channels, kernel_size, groups) describe {tuple(expected)}; a weight of another "
                             "shape needs a layer built for it")

    def weight_norm_bound(self, input_size=None) -> torch.Tensor:
        """Differentiable upper bound on the operator norm of the raw weight (0 for an empty one)."""
        return self._checked_bound(input_size)[0]

    def _checked_bound(self, input_size, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """``(bound, zero)``: the bound of ``weight`` (by default :meth:`_operator_weight`), checked
        (:func:`unusable_bounds`: a non-finite one raises), and whether it is zero with a tracked
        weight gradient (then refuse that gradient)."""
        if weight is None:
            weight = self._operator_weight()
        self._refuse_unsupported_dtype(weight)
        self._check_weight_shape(weight)
        if weight.numel() == 0:  # no input or no output features: the zero map
            return weight.sum(), False
        bound = self._operator_norm(weight, input_size, self.n_iter)
        if not (self.check_finite and can_check_values(bound)) or not bool(unusable_bounds(bound, weight.requires_grad)):
            return bound, False
        if not bool(torch.isfinite(bound)):
            self._raise_not_finite(bound, weight)
        return bound, True

    def _raise_not_finite(self, bound: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        weight = self.weight if weight is None else weight
        if bool(torch.isnan(weight).any()):
            state = "contains NaN"
        elif bool(torch.isinf(weight).any()):
            state = "contains inf"
        else:
            state = "is finite but too large for its dtype"
        raise FloatingPointError(
            f"{type(self).__name__}: the weight {state}, so its spectral bound is {float(bound.detach())}. "
            "Training has probably diverged: lower the learning rate or restore the last checkpoint."
        )

    def stack_key(self, weight: torch.Tensor | None = None) -> tuple | None:
        """Layers with equal keys can be bounded together on inputs of one size
        (:func:`lipnet.nn.stacked_normalized_weights`): their :meth:`_operator_norm` accepts a
        stack ``(L, ...)`` of operator weights and returns their ``L`` bounds in one
        computation. ``None``: this layer is bounded on its own (the default). ``weight``: a read
        of ``self.weight`` already made (as :meth:`_operator_weight` takes it), or ``None`` to read it."""
        return None

    def normalized_weight(self, input_size=None) -> torch.Tensor:
        """``weight / max(bound, TINY)``: the weight the layer actually applies (for a bfloat16
        or float16 weight, rounded so that its bound stays <= 1: :meth:`_divide`)."""
        if torch.jit.is_tracing():
            raise TypeError(f"{type(self).__name__} cannot be traced by torch.jit.trace: its normalized weight is "
                            "computed in Python from the weight (and a convolution's input size), and cached in eval "
                            "mode, so a trace would record it as a constant that ignores later weights. For a "
                            "plain-PyTorch copy with the normalized weights baked in, use lipnet.export(model, "
                            "input_shape); for speed, torch.compile")
        input_size = self._input_size(input_size)
        # Not under FakeTensorMode either: a fake normalized weight kept for later real calls (where the
        # refinement is off anyway: on a GPU, or under refine_exceeding(False)) broke them.
        cacheable = not self.training and not torch.compiler.is_compiling() and not fake_tensor_mode_active()
        weight = None
        if cacheable:
            weight = self.weight  # a parametrization computes a new tensor at every access: read it once
            self._check_weight_shape(weight)  # settings may change without the weight (not in the cache key)
            cacheable = not (torch.is_grad_enabled() and weight.requires_grad)
            # A weight of a torch.func transform (vmap, grad) is a wrapper without storage to key on.
            cacheable = cacheable and not torch._C._functorch.is_functorch_wrapped_tensor(weight)
        if cacheable:
            key = self._cache_key(weight, input_size)
            cached = self._eval_cache.get(input_size)
            if (cached is not None and cached[0] == key and cached[1] is weight
                    and (weight.is_meta or torch.equal(cached[4], weight))):
                # A copy: the caller may edit the tensor it gets (or wrap it in an nn.Parameter and train
                # that), which must not change what this layer applies.
                return cached[2].clone()
        # One read of the operator weight for the bound and the quotient: a parametrization computes
        # the weight anew at each access, and a random one (DropConnect) draws another each time.
        normalized = self._normalize(self._operator_weight(weight), input_size)
        if cacheable:
            if len(self._eval_cache) > 16:
                self._eval_cache.clear()
            # The weight itself, not a weak reference: torch.utils.swap_tensors (``.to()`` with
            # swapping, which ``torch.__future__`` can turn on) refuses tensors with weak
            # references. And its storage: ``weight.data = t`` moves the parameter to other memory
            # without a new version, and while the cached storage is held no later tensor can
            # take its address.
            # And a copy of its values: writes that bypass the version counter (``weight.data`` in place,
            # ``vector_to_parameters`` into a vector edited in place, another process's) change them alone.
            self._eval_cache[input_size] = (key, weight, normalized.detach().clone(), weight.untyped_storage(),
                                            weight.detach().clone())
        return normalized

    def _normalize(self, operator_weight: torch.Tensor, input_size) -> torch.Tensor:
        """``operator_weight`` (a read of :meth:`_operator_weight`) divided by its checked bound for
        ``input_size`` (as :meth:`_input_size` returns it), uncached: the normalized weight of one
        training step."""
        bound, zero = self._checked_bound(input_size, operator_weight)
        normalized = self._divide(operator_weight, bound, input_size)
        if zero:
            normalized = refuse_weight_gradient(normalized, self)
        return normalized

    def _divide(self, weight: torch.Tensor, bound: torch.Tensor, input_size) -> torch.Tensor:
        """``weight / max(bound, TINY)`` in the dtype of ``weight``.

        A bfloat16 or float16 weight is divided in float32 and rounded to its dtype. Rounding
        moves each entry by up to half a unit in the last place, which can lift the operator norm
        of the rounded weight above 1 (typically by up to 0.3% in bfloat16). So the rounded weight is
        bounded again (no gradient) and, while its bound exceeds 1, the quotient is scaled down
        by that bound and a growing number of rounding units and rounded anew; the weight the
        layer applies then has a bound <= 1 at float32's accuracy, as a float32 layer does. The
        check reads values: it is skipped where they cannot steer Python (:func:`can_check_values`).

        The divisor is also at least ``max|W| / (M / 2)``, ``M`` the weight dtype's largest finite
        value, so every entry of the quotient stays finite: an entry that reads only zero padding
        (a convolution whose taps all fall outside a small input) is not part of the operator,
        so the bound may be 0, and ``W / TINY`` would overflow to inf (in float16, whose ``M`` is
        65504, for entries of 1; in float32 above about 3e26) and make the forward
        ``inf * 0`` = NaN. Such a layer is then the zero map. Dividing by more than the bound only
        lowers the operator norm.
        """
        if weight.dtype.itemsize >= 4:
            return weight / finite_quotient_divisor(bound, weight, weight.dtype)
        bound = finite_quotient_divisor(bound, weight, torch.float32)
        quotient = weight.float() / bound
        rounded = quotient.to(weight.dtype)
        if rounded.numel() == 0 or not can_check_values(rounded):
            return rounded
        shrink = 1 - torch.finfo(weight.dtype).eps / 2  # one unit roundoff below 1
        scale, tries = 1.0, 0
        while True:
            with torch.no_grad():
                excess = float(self._operator_norm(rounded.detach().float(), input_size, self.n_iter))
            if not excess > 1:  # also stops on NaN, which the bound's own check reports
                return rounded
            tries += 1
            scale *= shrink ** tries / excess
            rounded = (quotient * scale).to(weight.dtype)

    def _input_size(self, input_size):
        """The input size a bound is for: ``input_size``, or what ``None`` stands for (a layer whose
        bound depends on its input size reads the last forward pass's); the cache is keyed on it."""
        return input_size

    def _cache_key(self, weight: torch.Tensor, input_size) -> tuple:
        """What a cached normalized weight depends on besides the identity of the weight tensor
        (a new tensor may reuse a freed one's memory and version number): its version counter,
        address, shape and strides (in-place updates, ``weight.data = ...``, also a view of the
        same memory such as ``weight.data = weight.data.t()``), optimizer steps (fused ones do not
        count versions), dtype and device, the bound's settings (the layer's Gram steps and
        :func:`lipnet.bounds.refine_exceeding`), the layer's geometry (:meth:`_geometry`: a stride
        or padding set after construction), inference mode (whose tensors cannot be used
        outside it), and ``check_finite`` (a weight cached unchecked is checked once it is on)."""
        return (input_size, weight._version, weight.data_ptr(), weight.shape, weight.stride(), weight.device,
                weight.dtype, _OPTIMIZER_STEPS[0],
                self.n_iter, getattr(self, "screen_iter", None), refines_exceeding(weight.device), self._geometry(),
                torch.is_inference_mode_enabled(), self.check_finite)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """Certified float64 upper bound on the Lipschitz constant of the layer as applied.

        The bound is computed on the normalized weight exactly as the forward pass uses
        it, in float64 with :data:`CERTIFICATION_N_ITER` Gram iterations on every frequency, and multiplied
        by ``1 + relative_rounding_margin(...)``. For a normalized layer it is 1 up to
        that margin (slightly below 1 when the training bound was loose).
        """
        weight = self.normalized_weight(input_size).detach().to(torch.float64)
        if weight.numel() == 0:
            return 0.0
        bound = float(self._operator_norm(weight, input_size, CERTIFICATION_N_ITER, exhaustive=True))
        rows, cols, taps = self._matrix_shape()
        return with_rounding_margin(bound, torch.float64, inner=max(rows, cols), rank=min(rows, cols), taps=taps,
                                    n_iter=CERTIFICATION_N_ITER)

    def _refuse_symbolic_tracing(self, input) -> None:
        """Raise a ``TypeError`` that says what to do when ``torch.fx.symbolic_trace`` (or a tool
        built on it) traces into the layer: its bound needs the input's size and values as numbers."""
        if isinstance(input, torch.fx.Proxy):
            raise TypeError(
                f"{type(self).__name__} cannot be traced through by torch.fx.symbolic_trace: its forward computes a "
                "Gram bound in Python from the input's size and checks its value. Trace lipnet's layers as leaves: a "
                "torch.fx.Tracer whose is_leaf_module(m, name) is True for type(m).__module__.startswith('lipnet.') "
                "(torchvision's create_feature_extractor: tracer_kwargs={'leaf_modules': [...]}); or trace the "
                "plain-PyTorch copy from lipnet.export(model, input_shape)")

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} cannot be compiled by TorchScript (torch.jit.script): its forward computes "
                        "a Gram bound in Python. For a plain-PyTorch copy with the normalized weights baked in, use "
                        "lipnet.export(model, input_shape); for speed, torch.compile")

    def _load_from_state_dict(self, *args, **kwargs):
        self._eval_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``.to()``, ``.double()``, ``.cuda()``, ...), emptying the eval
        cache first; a conversion to a complex dtype raises ``TypeError``."""
        self._eval_cache.clear()
        module = super()._apply(fn, recurse)
        self._refuse_unsupported_dtype()
        return module

    def __getstate__(self):
        """As ``nn.Module``'s, without the eval cache (copies and pickles rebuild it)."""
        return {**super().__getstate__(), "_eval_cache": {}}

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; also empties the eval-mode cache of normalized weights.

        The cache notices optimizer steps (fused ones included), ``load_state_dict``, ``.to()``,
        in-place updates of the parameter and ``weight.data = ...``, a new weight tensor
        (``torch.func.functional_call``, parametrizations), and changes of the bound's settings.
        Writes that bypass the version counter (e.g. through ``weight.data`` in place, or a
        custom kernel) are not seen: call ``model.eval()`` after them.
        """
        self._eval_cache.clear()
        return super().train(mode)


class GramNormalizedConv(GramNormalized):
    """Mixin for the Gram-normalized convolutions (:class:`~lipnet.nn.GramConv2d`,
    :class:`~lipnet.nn.GramConv1d`): what they share besides their bound and input size.

    The class that derives from this one directly (before its ``nn.Conv2d`` or ``nn.Conv1d``)
    defines :meth:`_operator_norm`, which takes stacks of weights (:meth:`stack_key`), and
    :meth:`_fixed_padding`, and calls :meth:`_init_conv_normalization` in its constructor.
    """

    # _input_size: which input size the bound is for (an override could bound a smaller one than the forward sees).
    LIPSCHITZ_BOUND_DEPENDS_ON = (*GramNormalized.LIPSCHITZ_BOUND_DEPENDS_ON, "_forward_normalized", "_conv_forward",
                                  "_input_size")
    screen_iter: int

    def _check_input(self, input) -> None:
        """Refuse what the convolution cannot take before its bound reads the input's size: a
        traced proxy (:meth:`_refuse_symbolic_tracing`), or an input without a channel axis and
        the spatial axes (torch's own check comes later, in the convolution)."""
        self._refuse_symbolic_tracing(input)
        dims = len(self._reversed_padding_repeated_twice) // 2
        if input.dim() not in (dims + 1, dims + 2):
            raise RuntimeError(f"{type(self).__name__}: Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) "
                               f"input, but got input of shape {tuple(input.shape)}")

    def _init_conv_normalization(self, n_iter: int, screen_iter: int) -> None:
        self._init_normalization(n_iter)
        if not isinstance(screen_iter, int) or screen_iter < 0:
            raise ValueError(f"screen_iter must be an integer >= 0, got {screen_iter!r}")
        self.screen_iter = screen_iter
        self._last_input_size = None

    def _geometry(self):
        # With the padding a non-zero padding mode applies (fixed at construction, besides ``padding``, which
        # the bound reads): a layer whose padding was changed since must neither reuse a cached normalized
        # weight (the forward's check of it runs when the bound is computed) nor share another's stacked bound.
        return tuple(snapshot(value) for value in (self.stride, self.padding, self.dilation, self.groups,
                                                   self.padding_mode, self._reversed_padding_repeated_twice))

    def _fixed_padding(self) -> tuple[int, ...]:
        """The ``_reversed_padding_repeated_twice`` that the ``nn.Conv2d`` or ``nn.Conv1d``
        constructor would fix for the current ``padding``."""
        raise NotImplementedError

    def _check_padding_unchanged(self) -> None:
        """Non-zero padding modes pad by ``_reversed_padding_repeated_twice``, which the
        ``nn.Conv2d`` or ``nn.Conv1d`` constructor fixes, while the bound reads ``padding``:
        refuse a ``padding`` changed since."""
        if self.padding_mode == "zeros":
            return  # F.conv2d and F.conv1d read self.padding themselves
        if tuple(self._reversed_padding_repeated_twice) != tuple(self._fixed_padding()):
            torch_class = next(cls for cls in type(self).__mro__ if cls.__module__ == "torch.nn.modules.conv")
            raise ValueError(f"{type(self).__name__}: padding was changed to {self.padding!r} after construction, but "
                             f"with padding_mode={self.padding_mode!r} the forward still pads by "
                             f"{tuple(self._reversed_padding_repeated_twice)} (nn.{torch_class.__name__} fixes it at "
                             "construction); build a new layer with the padding you want")

    def stack_key(self, weight=None):
        # Only the bound of the class right below this mixin (GramConv2d, GramConv1d) is known
        # to take stacks (conv2d_spectral_norm and conv1d_spectral_norm do); a subclass may
        # override it.
        owner = next(cls for cls in type(self).__mro__ if GramNormalizedConv in cls.__bases__)
        if type(self)._operator_norm is not owner._operator_norm:
            return None
        weight = self._operator_weight(weight)
        return (owner, tuple(weight.shape), weight.dtype, weight.device, *self._geometry(), self.n_iter,
                self.screen_iter)

    def extra_repr(self) -> str:
        screen = "" if self.screen_iter == DEFAULT_SCREEN_ITER else f", screen_iter={self.screen_iter}"
        return super().extra_repr() + f", n_iter={self.n_iter}" + screen
