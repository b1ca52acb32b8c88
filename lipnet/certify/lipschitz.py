"""A sound float64 upper bound on the L2 Lipschitz constant of a whole network.

The bound is composed from per-module bounds: for ``f = f_n o ... o f_1``,
``Lip(f) <= prod_i Lip(f_i)``, where each ``Lip(f_i)`` is taken for the input shape that
``f_i`` actually receives (found by a dry run on a zero input of batch size 1, since
convolution bounds depend on the spatial size). Every product and sum is rounded upwards
(``math.nextafter``), so the float64 result is never below the exact value of the
composition of the per-module bounds, which are themselves certified upper bounds.

How a module's bound is found, first match wins:

1. a function registered for its type with :func:`register_lipschitz_bound` (also used for
   subclasses that do not override ``forward``);
2. its own ``lipschitz_bound`` method, called with the spatial size of its input
   (``input_shape[1:]``) when it takes an argument (Gram layers, pooling, residual blocks,
   input normalization); an inherited method is refused when the subclass overrides
   ``forward``;
3. for ``nn.Sequential``, :class:`~lipnet.nn.GramSequential` and
   :class:`~lipnet.nn.ConvexResidual` (and subclasses that keep their ``forward``), the
   composition of their children's bounds.

The bounds of torch's other activations, of BatchNorm in eval mode and of shuffles, padding
and nearest upsampling are registered by :mod:`lipnet.certify.activation_bounds`,
:mod:`lipnet.certify.batch_norm_bound` and :mod:`lipnet.certify.copy_map_bounds`.

A module matching neither raises :class:`UnknownModuleError`, naming the module's path in
the model and its type: there is no default of 1. Bounds are for the model in eval mode
(dropout is the identity), the mode in which it is certified.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
from collections.abc import Callable
from contextvars import ContextVar
from fractions import Fraction

import torch
from torch import nn

from lipnet.bounds.circulant import pair
from lipnet.bounds.gram import max_matrix_spectral_norm, refine_exceeding
from lipnet.bounds.rounding import applied_scalar_magnitude, certification_arithmetic, with_rounding_margin
from lipnet.certify.modes import evaluating
from lipnet.models.wrappers import wrapper_chain
from lipnet.nn.activations import GroupSort, MaxMin
from lipnet.nn.gram_linear import GramLinear
from lipnet.nn.normalized import CERTIFICATION_N_ITER, GramNormalized
from lipnet.nn.pooling import adaptive_pooling_lipschitz_bound, pooling_lipschitz_bound, sqrt_up, window_multiplicity
from lipnet.nn.residual import ConvexResidual
from lipnet.nn.sequential import GramSequential, call_override

#: ``fn(module, input_shape) -> float``: a sound upper bound on the module's L2 Lipschitz
#: constant for inputs of ``input_shape`` (one example, no batch dimension).
BoundFunction = Callable[[nn.Module, tuple[int, ...]], float]

_REGISTRY: dict[type, BoundFunction] = {}
#: While set, ``{(id(module), input_shape): bound}`` of every module bounded as a unit.
_RECORD: ContextVar[dict | None] = ContextVar("lipnet_module_bounds", default=None)
#: Containers whose bound composes their children's: ``fn(module, x) -> (bound, output)``.
_COMPOSITES: dict[type, Callable] = {}


class LipschitzBoundError(ValueError):
    """No sound bound could be computed for a module; ``path`` locates it in the model."""

    def __init__(self, module: nn.Module, reason: str):
        super().__init__(reason)
        self.module = module
        self.reason = reason
        self.path: str | None = None

    def __str__(self) -> str:
        where = f"module '{self.path}'" if self.path else "the model itself" if self.path == "" else "a module"
        return f"{where} ({type(self.module).__module__}.{type(self.module).__qualname__}): {self.reason}"


class UnknownModuleError(LipschitzBoundError, TypeError):
    """No Lipschitz bound is registered or defined for a module type."""

    def __init__(self, module: nn.Module):
        name = type(module).__name__
        super().__init__(module, (
            f"no Lipschitz bound is known for {name}. Register one with "
            f"lipnet.certify.register_lipschitz_bound({name}, fn), where fn(module, input_shape) returns a sound "
            f"float upper bound on its L2 Lipschitz constant for inputs of that shape, or give {name} a "
            "lipschitz_bound(input_size) method. A container with a custom forward needs a bound that accounts for "
            "how it combines its children (lipnet.certify.lipschitz_bound(child, shape) bounds each child)."
        ))


def register_lipschitz_bound(module_type: type, fn: BoundFunction | None = None):
    """Register ``fn(module, input_shape) -> float`` as the Lipschitz bound of ``module_type``.

    Replaces any earlier registration of the type, including the built-in ones. Usable as a
    decorator. The function must return a *sound* upper bound: certificates are only as true
    as it is.

    Example:
        >>> class Half(nn.Module):
        ...     def forward(self, x):
        ...         return x / 2
        >>> register_lipschitz_bound(Half, lambda module, shape: 0.5)  # doctest: +ELLIPSIS
        <function <lambda> at ...>
        >>> lipschitz_bound(nn.Sequential(Half(), nn.ReLU()), (3,))
        0.5
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def decorator(function: BoundFunction) -> BoundFunction:
        if not callable(function):
            raise TypeError(f"the bound of {module_type.__name__} must be callable (module, input_shape) -> float")
        _REGISTRY[module_type] = function
        return function

    return decorator if fn is None else decorator(fn)


def lipschitz_bound(model: nn.Module, input_shape) -> float:
    """Certified float64 upper bound on the L2 Lipschitz constant of ``model`` in eval mode.

    Args:
        model: a network of modules with known bounds (``nn.Sequential`` and
            :class:`~lipnet.nn.ConvexResidual` containers compose their children's).
        input_shape: shape of one input, without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns:
        A float ``L`` with ``||model(x) - model(x')|| <= L ||x - x'||`` for all inputs of that
        shape, in exact arithmetic on the weights the layers apply (inf when the product of the
        module bounds, each finite, exceeds the largest float).

    Raises:
        UnknownModuleError: a module has no known bound (the message names it and says how
            to register one).
        LipschitzBoundError: a bound function returned a negative, NaN or non-number value; a
            module has forward hooks (they may change its output); a module's call runs
            another ``forward`` than its class's (one assigned to the instance, or an
            overridden ``__call__``); a subclass overrides ``forward`` (or a helper its bound
            relies on) but inherits the bound; a module acts on the batch dimension
            (``nn.Flatten(0, ...)``, ``nn.Unflatten(0, ...)``, ``MaxMin(dim=0)``,
            ``GroupSort(k, dim=0)``), so that an example's output depends on the rest of its
            batch; a module's output on the dry run has entries that are not finite; a module is
            applied to a complex value (an earlier module's output: bounds hold for real inputs); a module
            passes something else than a tensor to the next one of an ``nn.Sequential``; or a
            :class:`~lipnet.nn.ConvexResidual`'s branch overwrites its input in place.

    Example:
        >>> from lipnet.nn import GramConv2d, GramLinear, MaxMin
        >>> net = nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(64, 10))
        >>> lipschitz_bound(net, (1, 4, 4)) <= 1 + 1e-5
        True
    """
    input_shape = check_input_shape(input_shape)
    try:
        bound, out = _bound_and_output(model, input_shape)
    except (LipschitzBoundError, NotImplementedError, torch.OutOfMemoryError):
        raise
    except (ValueError, RuntimeError, IndexError) as error:  # most often a wrong input_shape: say which was given
        if _INPUT_SHAPE_NOTE in str(error):  # a bound that called lipschitz_bound: noted once
            raise
        raise ValueError(f"{error} ({_INPUT_SHAPE_NOTE} {input_shape}: input_shape is the shape of one input "
                         "without the batch dimension, e.g. (3, 32, 32) for 3-channel 32x32 images)") from error
    if not torch.is_tensor(out):
        raise LipschitzBoundError(unwrap_checked(model), (
            f"the model returns a {type(out).__name__}, not one tensor: its Lipschitz bound is of a map to one "
            "tensor (the logits), and what else it returns (max pooling's indices, for one) may jump; certify "
            "a model that returns the logits alone"))
    return bound


_INPUT_SHAPE_NOTE = "while bounding the model on one input of shape"


def module_output_lipschitz_bound(module: nn.Module, input_shape) -> float:
    """:func:`lipschitz_bound` of a module inside a traced forward, whose output may be a tuple
    (max pooling's values and indices): the bound is that of its floating-point values, and the
    caller bounds what it takes of it (:mod:`lipnet.convert` refuses integer results)."""
    return _bound_and_output(module, input_shape)[0]


def as_compiled(model: nn.Module):
    """The bounds the model applies: for a ``torch.compile`` wrapper, its Gram layers' bounds as a
    compiled forward computes them (screened alone, without the CPU's refinement of exceeding
    frequencies, :func:`~lipnet.bounds.refine_exceeding`), else as they are. A compiled model
    whose Gram layers hold half-precision weights is refused: its graph applies the rounded
    quotient ``W / bound`` without the check that rescales it to a norm <= 1."""
    from torch._dynamo.eval_frame import OptimizedModule

    *wrappers, inner = _wrapper_chain(model)
    # nn.Module.compile() compiles in place: the module's calls run its compiled forward. The whole
    # model so compiled is a compiled model; a part of it would compute its bounds otherwise than the
    # rest (screened alone, against the CPU's eager refinement), and no one setting certifies both.
    for path, module in inner.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None and module is not inner:
            error = LipschitzBoundError(module, (
                "it is compiled in place (module.compile()) inside the model: its Gram bounds are computed as a "
                "compiled forward computes them, the rest's as an eager one does, and a certificate takes one of "
                "the two for the whole model; compile the whole model (model.compile() or torch.compile(model)), "
                "or none of it"))
            error.path = path
            raise error
    # The model itself or a wrapper around it (AveragedModel(model).compile()) compiled in place is compiled.
    compiled_in_place = any(getattr(m, "_compiled_call_impl", None) is not None for m in (*wrappers, inner))
    if not compiled_in_place and not any(type(wrapper) is OptimizedModule for wrapper in wrappers):
        return contextlib.nullcontext()
    for path, module in inner.named_modules():
        weight = getattr(module, "weight", None) if isinstance(module, GramNormalized) else None
        if torch.is_tensor(weight) and weight.dtype in (torch.bfloat16, torch.float16):
            error = LipschitzBoundError(module, (
                f"the model is compiled (torch.compile) and this Gram layer's weight is {weight.dtype}: a compiled "
                "forward applies its rounded normalized weight without the check that keeps its norm <= 1; certify "
                "the model inside (model._orig_mod), which applies the checked weight, or keep the weights in "
                "float32 (autocast computes in bfloat16 all the same)"))
            error.path = path
            raise error
    return refine_exceeding(False)


def _bound_and_output(model: nn.Module, input_shape) -> tuple[float, object]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    with as_compiled(model):
        return _bound_and_output_of(model, input_shape)


def _bound_and_output_of(model: nn.Module, input_shape) -> tuple[float, object]:
    model = unwrap_checked(model)
    shape = check_input_shape(input_shape)
    dtype, device = _dtype_and_device(model)
    try:
        # Gradual underflow: with subnormals flushed to 0, a bound below 2^-1022 became 0 (two BatchNorms
        # of gain 1e-160: 0 for a Lipschitz constant of 1e-320).
        with certification_arithmetic(), evaluating(model), torch.no_grad():
            x = torch.zeros((1, *shape), dtype=dtype, device=device)
            split = split_plain_last_linear(model)
            if split is not None:
                bound, out = _body_and_plain_last_bound(*split, x)
            else:
                bound, out = _module_bound(model, x)
    except LipschitzBoundError as error:
        names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        if id(error.module) in names:
            error.path = names[id(error.module)]
        raise
    return bound, out


def check_input_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (numpy's and torch's integers included), or a
    ``ValueError`` saying what it must be: ``4`` for ``(4,)``, ``(3, 8.7)`` truncated to
    ``(3, 8)`` or ``True`` for 1 would bound another input than the one meant. (Also the check
    of :func:`lipnet.export` and :func:`lipnet.convert`.)"""
    try:
        shape = tuple(None if isinstance(s, bool) or (torch.is_tensor(s) and s.dtype == torch.bool)
                      else operator.index(s) for s in input_shape)
    except TypeError:
        shape = None
    if not shape or any(s is None or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints without the batch dimension, "
                         f"e.g. (3, 32, 32) or (4,); got {input_shape!r}")
    return shape


def split_last_linear(model: nn.Module) -> tuple[nn.Sequential, nn.Linear] | None:
    """``(body, last)`` when ``model`` is an ``nn.Sequential`` ending in an ``nn.Linear``, else ``None``.

    ``body`` is a plain ``nn.Sequential`` sharing the modules of ``model``. A
    :class:`~lipnet.nn.GramSequential` counts (in eval mode its forward is ``nn.Sequential``'s).
    """
    sequential_forwards = (nn.Sequential.forward, GramSequential.forward)
    if not isinstance(model, nn.Sequential) or type(model).forward not in sequential_forwards or len(model) < 1:
        return None
    try:  # hooks (its own or global) or a forward of the instance: the model is not its body and last layer
        check_no_forward_hooks(model)
        check_runs_own_forward(model)
    except LipschitzBoundError:
        return None
    *body, last = list(model)
    if not is_plain_linear(last):
        return None
    return nn.Sequential(*body), last


def split_plain_last_linear(model: nn.Module) -> tuple[nn.Sequential, nn.Linear] | None:
    """:func:`split_last_linear` when its last layer is a plain ``nn.Linear`` (not a
    :class:`~lipnet.nn.GramLinear`): the one place a plain layer is bounded
    (:func:`plain_linear_lipschitz_bound`)."""
    split = split_last_linear(model)
    return split if split is not None and not isinstance(split[1], GramLinear) else None


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` computes exactly ``x W^T + b`` with the weight :func:`applied_weight` reads.

    True for ``nn.Linear`` and :class:`~lipnet.nn.GramLinear` and subclasses that keep their
    ``forward`` (and, for ``GramLinear``, the helpers its bound relies on) and have no forward
    hooks. The last-layer radius reads the weight rows directly, so anything else falls back
    to the generic radius. A plain ``nn.Linear`` with a parametrization (``spectral_norm``,
    ``weight_norm``, a random one) is not: each read of its weight computes it anew, so the
    rows read need not be those a forward applies.
    """
    if not isinstance(layer, nn.Linear) or has_forward_hooks(layer):
        return False
    if not isinstance(layer, GramLinear) and torch.nn.utils.parametrize.is_parametrized(layer):
        return False
    return overridden_forward_part(layer, GramLinear if isinstance(layer, GramLinear) else nn.Linear) is None


def plain_linear_lipschitz_bound(layer: nn.Linear) -> float:
    """Certified float64 bound on the operator norm of a plain ``nn.Linear``'s weight: its Gram
    bound with every frequency iterated :data:`~lipnet.nn.normalized.CERTIFICATION_N_ITER` times,
    times ``1 + `` its rounding margin. Used for the plain last layer of :func:`split_last_linear`."""
    if layer.weight.is_complex():  # .double() would keep the real part alone
        raise LipschitzBoundError(layer, (
            f"its weight is complex ({layer.weight.dtype}): the plain last layer's bound is of a real matrix; end "
            "the model with real outputs"))
    weight = layer.weight.detach().double()
    if not bool(torch.isfinite(weight).all()):
        raise LipschitzBoundError(layer, "the last linear layer's weight has NaN or inf entries")
    if weight.numel() == 0:
        return 0.0
    bound = float(max_matrix_spectral_norm(weight[None], CERTIFICATION_N_ITER, screen_iter=CERTIFICATION_N_ITER))
    return with_rounding_margin(bound, torch.float64, inner=max(weight.shape), rank=min(weight.shape), taps=1,
                                n_iter=CERTIFICATION_N_ITER)


def _body_and_plain_last_bound(body: nn.Sequential, last: nn.Linear, x: torch.Tensor):
    """``(bound, output)`` of a model :func:`split_last_linear` splits into ``body`` and a plain
    ``nn.Linear`` (a last layer trained without normalization, whose rows the last-layer radius
    reads): the body's bound times :func:`plain_linear_lipschitz_bound`, as
    :func:`~lipnet.certify.certified_accuracy` takes it. A plain ``nn.Linear`` anywhere else has
    no bound (it is what :func:`lipnet.convert` replaces)."""
    body_bound, features = _module_bound(body, x)
    if not torch.is_tensor(features):
        raise LipschitzBoundError(body[-1] if len(body) else body, (
            f"it returns a {type(features).__name__}, not a tensor, to the last linear layer"))
    if features.is_complex():
        raise LipschitzBoundError(last, (
            f"it is applied to a complex value ({features.dtype}, the output of an earlier module): its bound is "
            "for real inputs"))
    own = _checked(last, plain_linear_lipschitz_bound(last))
    record = _RECORD.get()
    if record is not None:
        record[(id(last), tuple(features.shape[1:]))] = own
    return mul_up(body_bound, own), _checked_output(last, last(features))


def mul_up(a: float, b: float) -> float:
    """The smallest float ``>= a * b`` (``a, b >= 0``): the product rounded upwards, exactly
    (inf when it exceeds the largest float, and when ``a`` or ``b`` is such an inf)."""
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return _round_up_exact(a * b, Fraction(a) * Fraction(b))


def add_up(a: float, b: float) -> float:
    """The smallest float ``>= a + b`` (``a, b >= 0``): the sum rounded upwards, exactly
    (inf as for :func:`mul_up`)."""
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return _round_up_exact(a + b, Fraction(a) + Fraction(b))


def _round_up_exact(rounded: float, exact: Fraction) -> float:
    if math.isinf(rounded) or Fraction(rounded) >= exact:
        return rounded
    return math.nextafter(rounded, math.inf)


def call_registered_bound(fn: BoundFunction, module: nn.Module, shape: tuple[int, ...]) -> float:
    """``fn(module, shape)``, a rule's failure to read the module's settings (``ValueError``,
    ``TypeError``) reported as the :class:`LipschitzBoundError` of that module."""
    try:
        return fn(module, shape)
    except LipschitzBoundError:
        raise
    except (ValueError, TypeError) as exc:
        raise LipschitzBoundError(module, f"its registered bound failed on inputs of shape {shape}: {exc}") from exc


def _module_bound(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(bound, module(x))`` for the dummy input ``x``."""
    check_no_forward_hooks(module)
    check_runs_own_forward(module)
    if x.is_complex():
        raise LipschitzBoundError(module, (
            f"it is applied to a complex value ({x.dtype}, the output of an earlier module): the bounds of modules "
            "hold for real inputs (complex tanh, for one, has poles on the imaginary axis), and the bound rules see "
            "only the input's shape"))
    shape = tuple(x.shape[1:])
    fn = _lookup(_REGISTRY, module)
    record = _RECORD.get()
    if record is not None and (id(module), shape) in record:  # bounded before (module_lipschitz_bounds's reuse)
        return record[(id(module), shape)], _checked_output(module, module(x))
    if fn is not None:
        value = call_registered_bound(fn, module, shape)
    elif callable(getattr(module, "lipschitz_bound", None)):
        _check_method_matches_forward(module)
        method = module.lipschitz_bound
        value = method(shape[1:]) if inspect.signature(method).parameters else method()
    elif (composite := _lookup(_COMPOSITES, module)) is not None:
        return composite(module, x)
    else:
        raise UnknownModuleError(module)
    value = _checked(module, value)
    if record is not None:
        record[(id(module), shape)] = value
    return value, _checked_output(module, module(x))


def module_lipschitz_bounds(model: nn.Module, input_shape, reuse: dict | None = None) -> tuple[float, dict]:
    """:func:`lipschitz_bound` and the bound of each module it bounded as a unit.

    Returns ``(L, bounds)`` with ``bounds[(id(module), shape)]`` the bound used for
    ``module`` on inputs of ``shape`` (one example); containers that compose their children
    (``nn.Sequential``, :class:`~lipnet.nn.ConvexResidual`) have no entry. A module bounded
    twice on one shape (called twice, or listed in ``reuse``, the ``bounds`` of an earlier call
    on the same unchanged modules) is bounded once.
    """
    record: dict = dict(reuse or {})
    token = _RECORD.set(record)
    try:
        bound = lipschitz_bound(model, input_shape)
    finally:
        _RECORD.reset(token)
    return bound, record


def check_no_forward_hooks(module: nn.Module) -> None:
    """Refuse a module with forward (pre-)hooks, its own or global: they change what it computes.

    A hook can rescale a module's input or output, and no bound of the module accounts for
    that; the certified model must compute exactly what its modules' bounds describe.
    """
    from torch.nn.modules import module as torch_module

    own = has_forward_hooks(module)
    anywhere = bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
    if own and not module._forward_hooks and (advice := _weight_hook_advice(module)) is not None:
        raise LipschitzBoundError(module, advice)
    if own or anywhere:
        where = "has forward hooks" if own else "would run global forward hooks (nn.modules.module.register_module_forward_hook)"
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} {where}, which may change its output, and no Lipschitz bound accounts for "
            "them; remove the hooks (handle.remove()) before certifying"))


def _weight_hook_advice(module: nn.Module) -> str | None:
    """What to do about forward pre-hooks that are all torch's weight reparametrizations by hook
    (``torch.nn.utils.prune``, the legacy ``torch.nn.utils.spectral_norm`` and ``weight_norm``),
    which recompute a weight before each call; ``None`` for any other hook."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    advice = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            advice.append(f"it is pruned (torch.nn.utils.prune): make the pruning permanent with "
                          f"torch.nn.utils.prune.remove(module, {hook._tensor_name!r})")
        elif isinstance(hook, SpectralNorm):
            advice.append(f"it has torch.nn.utils.spectral_norm's hook: use torch.nn.utils.parametrizations.spectral_norm "
                          f"instead, or torch.nn.utils.remove_spectral_norm(module, {hook.name!r})")
        elif isinstance(hook, WeightNorm):
            advice.append(f"it has torch.nn.utils.weight_norm's hook: use torch.nn.utils.parametrizations.weight_norm "
                          f"instead, or torch.nn.utils.remove_weight_norm(module, {hook.name!r})")
        else:
            return None
    return (f"{type(module).__name__} has forward pre-hooks that recompute its weight before each call, and its "
            f"Lipschitz bound is computed before the call: " + "; ".join(advice) + " before certifying")


def check_runs_own_forward(module: nn.Module) -> None:
    """Refuse a module whose call runs something other than its class's ``forward``.

    ``nn.Module.__call__`` runs a ``forward`` assigned to the instance (``module.forward =
    ...``, as wrappers that patch a module do) instead of the class's, and a class may
    override ``__call__`` itself; bounds are known for class forwards only
    (:func:`~lipnet.nn.sequential.call_override`).
    """
    if (override := call_override(module)) is not None:
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} {override}, so calling it does not run {type(module).__name__}.forward, "
            "which its Lipschitz bound describes; certify the module without the override (e.g. del module.forward), "
            "or make it a subclass with its own lipschitz_bound or a registered bound "
            "(lipnet.certify.register_lipschitz_bound)"))


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or forward pre-hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def overridden_forward_part(module: nn.Module, owner: type) -> str | None:
    """The first of ``forward`` and ``owner.LIPSCHITZ_BOUND_DEPENDS_ON`` that ``module`` does
    not take from ``owner`` (overridden by its class, or assigned to the instance), or
    ``None`` when it computes ``owner.forward`` as written."""
    for name in ("forward", *getattr(owner, "LIPSCHITZ_BOUND_DEPENDS_ON", ())):
        if getattr(type(module), name, None) is not getattr(owner, name, None) or name in vars(module):
            return name
    if call_override(module) is not None:
        return "__call__"
    return None


def _check_method_matches_forward(module: nn.Module) -> None:
    """Refuse an inherited ``lipschitz_bound`` whose class's ``forward`` was overridden.

    The method's owner is the class defining it, or, for a mixin that is not a module
    (like :class:`~lipnet.nn.normalized.GramNormalized`), the nearest module class using it.
    An owner without a ``forward`` of its own is an abstract base whose bound is declared
    for the ``forward`` of its subclasses. The helpers that the owner's ``forward`` calls and
    its bound relies on, listed in its ``LIPSCHITZ_BOUND_DEPENDS_ON``, must not be overridden
    either.
    """
    mro = type(module).__mro__
    defining = next(i for i, cls in enumerate(mro) if "lipschitz_bound" in vars(cls))
    owner = next((cls for cls in reversed(mro[:defining + 1]) if issubclass(cls, nn.Module)), None)
    if owner is None:
        return
    if getattr(owner, "forward", None) is nn.Module.forward:
        # An abstract base: its bound is declared for the forwards of the subclasses written with it
        # (in its own module), not for any forward a further subclass may define.
        forward_owner = next(cls for cls in mro if "forward" in vars(cls))
        if forward_owner is nn.Module or forward_owner.__module__ != owner.__module__:
            raise LipschitzBoundError(module, (
                f"{type(module).__name__} defines its own forward (in {forward_owner.__name__}) but inherits the "
                f"lipschitz_bound of {owner.__name__}, which bounds the forwards of {owner.__module__} only; define "
                f"{type(module).__name__}.lipschitz_bound or register a bound with "
                "lipnet.certify.register_lipschitz_bound"))
        owner = forward_owner
    if (name := overridden_forward_part(module, owner)) is not None:
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} overrides {owner.__name__}.{name} but inherits its lipschitz_bound, "
            f"which bounds {owner.__name__}.forward as written; define {type(module).__name__}.lipschitz_bound "
            "or register a bound with lipnet.certify.register_lipschitz_bound"))


def _lookup(table: dict, module: nn.Module):
    """The entry of the nearest registered base class whose ``forward`` the module still uses
    (none when the module's call runs another one: :func:`check_runs_own_forward`)."""
    if call_override(module) is not None:
        return None
    cls = type(module)
    for base in cls.__mro__:
        if base in table and (base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None)):
            return table[base]
    return None


def _checked(module: nn.Module, value) -> float:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise LipschitzBoundError(module, f"the Lipschitz bound must be a number, got a tensor of shape "
                                              f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise LipschitzBoundError(module, f"the Lipschitz bound must be a number, got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise LipschitzBoundError(module, f"the Lipschitz bound must be finite and >= 0, got {value}")
    return value


def _checked_output(module: nn.Module, out):
    """The dry run's output of a module bounded as a unit, refused where it is not finite.

    A Lipschitz map is finite everywhere: an output with NaN or infinite entries (a NaN
    parameter, an overflow) at the dry run's input has no Lipschitz constant. The
    floating-point tensors of a tuple output (max pooling's values next to its indices) are
    checked alike; what may follow a tuple is :func:`_sequential_bound`'s concern.
    """
    tensors = out if isinstance(out, tuple | list) else (out,)
    for tensor in tensors:
        if (torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.is_meta
                and not bool(torch.isfinite(tensor).all())):
            raise LipschitzBoundError(module, (
                f"{type(module).__name__}'s output on the dry run (the model applied to zeros) has entries that are "
                "not finite (NaN or infinite): a NaN parameter or an overflow, and no Lipschitz constant bounds a map "
                "that is not finite; check its parameters and buffers for NaN or inf"))
    return out


def unwrap_checked(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, (Distributed)DataParallel and
    ``torch.optim.swa_utils.AveragedModel`` (EMA, SWA) wrappers, whose forward is their module's;
    a wrapper with forward hooks is refused (they would change what the wrapper computes)."""
    return _wrapper_chain(model)[-1]


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, ..., the module inside]``: the wrappers :func:`unwrap_checked` goes through (torch's own
    classes running their own forwards: :func:`lipnet.models.wrappers.wrapper_chain`), then what
    it returns; each wrapper's hooks are checked on the way."""
    from torch._dynamo.eval_frame import OptimizedModule

    chain = wrapper_chain(model)
    for wrapper in chain[:-1]:
        check_no_forward_hooks(wrapper)
        if not isinstance(wrapper, OptimizedModule):  # its forward is an instance attribute: the compiled call
            check_runs_own_forward(wrapper)
    return chain


def _dtype_and_device(model: nn.Module):
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


# ----------------------------------------------------------------------------- containers


def _sequential_bound(module: nn.Sequential, x: torch.Tensor):
    """The product of the children's bounds; a child that returns something else than a tensor
    to the next one is refused (the bound of max pooling with ``return_indices=True`` is that of
    its values; the integer indices passed on with them jump)."""
    bound = 1.0
    previous = None
    for child in module:
        if previous is not None and not torch.is_tensor(x):
            raise LipschitzBoundError(previous, (
                f"{type(previous).__name__} returns a {type(x).__name__}, not a tensor, to the next module of its "
                "nn.Sequential (max pooling with return_indices=True returns values and indices, and indices jump "
                "under tiny changes of the input); its bound describes tensor outputs only. Use "
                "return_indices=False, or take the values in a module of your own"))
        child_bound, x = _module_bound(child, x)
        bound = mul_up(bound, child_bound)
        previous = child
    return bound, x


def _convex_residual_bound(module: ConvexResidual, x: torch.Tensor):
    """``|1 - alpha| + |alpha| * Lip(branch)`` with the coefficients the forward applies: those
    of ``module.coefficients()`` as it holds them (the forward mixes in the widest dtype).

    The forward computes ``branch(x)`` before it reads ``x`` again, so a branch that overwrites
    its input in place (``nn.LeakyReLU(5, inplace=True)`` as its first module) makes the block
    ``(1 - alpha) f_0(x) + alpha f(x)``, not the combination bounded here: refused, as seen by
    the version counter of the dry run's input (a tensor that has one even under inference mode).
    """
    with torch.inference_mode(False):
        x = x.clone()
    version = x._version
    branch_bound, out = _module_bound(module.branch, x)
    if x._version != version:
        raise LipschitzBoundError(module, (
            "its branch overwrites the block's input in place (an in-place module such as nn.ReLU(inplace=True) "
            "or a view of the input written to), and ConvexResidual.forward reads that input again after the branch: "
            "it computes (1 - alpha) g(x) + alpha f(x) with g the in-place part, not (1 - alpha) x + alpha f(x), and "
            "the bound |1 - alpha| + |alpha| Lip(f) does not hold. Use inplace=False for the modules that act on the "
            "branch's input"))
    keep, alpha = module.coefficients()
    keep, alpha = (abs(float(c.detach().double())) for c in (keep, alpha))  # as held: the forward casts them up only
    if math.isnan(keep) or math.isnan(alpha):
        raise LipschitzBoundError(module, (
            "its mixing weight is NaN (alpha_logit is NaN: training diverged), so the block's output is NaN and no "
            "Lipschitz constant bounds it; restore alpha_logit from a checkpoint or set it to a number"))
    return add_up(keep, mul_up(alpha, branch_bound)), module(x)


_COMPOSITES[nn.Sequential] = _sequential_bound
# In eval mode (certification runs in it) GramSequential.forward is nn.Sequential's.
_COMPOSITES[GramSequential] = _sequential_bound
_COMPOSITES[ConvexResidual] = _convex_residual_bound


# ----------------------------------------------------------------------------- built-in bounds


def _constant(value: float) -> BoundFunction:
    return lambda module, shape: value


# Shape changes, and maps that are the identity in eval mode.
for _type in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
              nn.FeatureAlphaDropout):
    register_lipschitz_bound(_type, _constant(1.0))
# Activations with derivative in [-1, 1].
for _type in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softsign):
    register_lipschitz_bound(_type, _constant(1.0))
register_lipschitz_bound(nn.Sigmoid, _constant(0.25))


def refuse_nan_parameters(module: nn.Module, **parameters) -> None:
    """Refuse ``module`` when one of its scalar ``parameters`` is NaN: its outputs are NaN for
    some inputs (``0 * nan``, ``clamp(x, nan)``), which no Lipschitz constant bounds."""
    for name, value in parameters.items():
        if math.isnan(float(value)):
            raise LipschitzBoundError(module, (
                f"{type(module).__name__} has {name}=NaN, so some of its outputs are NaN and no Lipschitz constant "
                f"bounds it; set {name} to a number"))


@register_lipschitz_bound(nn.Hardtanh)
def _hardtanh(module: nn.Hardtanh, shape) -> float:
    """1: ``clamp(x, min_val, max_val)`` (infinite limits included; NaN ones refused)."""
    refuse_nan_parameters(module, min_val=module.min_val, max_val=module.max_val)
    return 1.0


def _refuse_batch_dim(module: nn.Module, name: str, dim: int, shape) -> None:
    """Refuse ``module`` when its argument ``name=dim`` (counted with the batch dimension,
    negative from the end) is the batch dimension of inputs ``(N, *shape)``."""
    ndim = len(shape) + 1
    if -ndim <= dim < ndim and dim % ndim == 0:  # a dimension out of range fails in the dry run
        raise LipschitzBoundError(module, (
            f"{type(module).__name__} with {name}={dim} acts on the batch dimension of inputs of shape "
            f"(N, {', '.join(map(str, shape))}), so each example's output depends on the other examples of its "
            "batch and no per-example Lipschitz bound exists; use dimensions >= 1 (within one example)"))


@register_lipschitz_bound(nn.Flatten)
def _flatten(module: nn.Flatten, shape) -> float:
    """1 (a rearrangement) unless it merges the batch dimension with others."""
    ndim = len(shape) + 1
    if module.start_dim % ndim != module.end_dim % ndim:
        _refuse_batch_dim(module, "start_dim", module.start_dim, shape)
    return 1.0


@register_lipschitz_bound(nn.Unflatten)
def _unflatten(module: nn.Unflatten, shape) -> float:
    """1 (a rearrangement) unless it splits the batch dimension."""
    if not isinstance(module.dim, int):
        raise LipschitzBoundError(module, f"Unflatten of the named dimension {module.dim!r} is not supported; "
                                          "give the dimension's index")
    _refuse_batch_dim(module, "dim", module.dim, shape)
    return 1.0


@register_lipschitz_bound(MaxMin)
def _max_min(module: MaxMin, shape) -> float:
    """1: it permutes each pair of channels along ``module.dim`` (not the batch dimension)."""
    _refuse_batch_dim(module, "dim", module.dim, shape)
    return 1.0


@register_lipschitz_bound(GroupSort)
def _group_sort(module: GroupSort, shape) -> float:
    """1: it permutes each group of channels along ``module.dim`` (not the batch dimension)."""
    _refuse_batch_dim(module, "dim", module.dim, shape)
    return 1.0


@register_lipschitz_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, shape) -> float:
    """Slopes 1 and ``negative_slope`` as a kernel may round it (NaN refused: ``max(1, nan)`` is 1)."""
    refuse_nan_parameters(module, negative_slope=module.negative_slope)
    return max(1.0, applied_scalar_magnitude(module.negative_slope))


@register_lipschitz_bound(nn.ELU)
def _elu(module: nn.ELU, shape) -> float:
    """Derivative 1 for ``x > 0`` and ``alpha * exp(x) <= alpha`` for ``x <= 0``, with ``alpha`` as a
    kernel may round it (NaN refused)."""
    refuse_nan_parameters(module, alpha=module.alpha)
    return max(1.0, applied_scalar_magnitude(module.alpha))


@register_lipschitz_bound(nn.MaxPool2d)
def _max_pool(module: nn.MaxPool2d, shape) -> float:
    """``sqrt(m)`` (see :mod:`lipnet.nn.pooling`); valid for any padding and ceil_mode."""
    kernel = _pool_pair(module.kernel_size, "kernel_size")
    return pooling_lipschitz_bound(kernel, _pool_pair(module.stride, "stride", kernel),
                                   _pool_pair(module.dilation, "dilation"))


def _unset_stride(value) -> bool:
    """Whether a pooling stride is left to its default, the kernel size (``None`` or empty, as torch reads it)."""
    return value is None or isinstance(value, tuple | list) and len(value) == 0


def _pool_pair(value, name: str, default=None) -> tuple[int, int]:
    """A 2-D pooling setting as torch's functional pooling reads it: one value for both axes
    (``2``, ``(2,)``), a pair, or, for the stride only, ``None`` or empty for ``default`` (the
    kernel size); ``name`` says in an error which setting it was."""
    if default is not None and _unset_stride(value):
        return default
    if isinstance(value, tuple | list) and len(value) == 1:
        value = value[0]
    return pair(value, name)


@register_lipschitz_bound(nn.AvgPool2d)
def _avg_pool(module: nn.AvgPool2d, shape) -> float:
    """``sqrt(m) * sqrt(k_h k_w) / divisor``: average pooling is a scaled sum over each window."""
    kernel = _pool_pair(module.kernel_size, "kernel_size")
    stride = _pool_pair(module.stride, "stride", kernel)
    padding = _pool_pair(module.padding, "padding")
    if module.ceil_mode or (not module.count_include_pad and any(padding)):
        raise LipschitzBoundError(module, "AvgPool2d with ceil_mode=True, or with padding and "
                                          "count_include_pad=False, divides some windows by fewer entries; "
                                          "use ceil_mode=False and count_include_pad=True (or lipnet.nn.ScaledAvgPool2d)")
    divisor = module.divisor_override or math.prod(kernel)
    m = math.prod(window_multiplicity(k, s) for k, s in zip(kernel, stride))
    return sqrt_up(Fraction(m * math.prod(kernel), divisor**2))


def _adaptive_output_size(module, shape) -> tuple[int, int]:
    out = module.output_size if isinstance(module.output_size, tuple | list) else (module.output_size,) * 2
    return tuple(n if o is None else int(o) for o, n in zip(out, shape[-2:]))


@register_lipschitz_bound(nn.AdaptiveAvgPool2d)
def _adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, shape) -> float:
    return adaptive_pooling_lipschitz_bound(shape[-2:], _adaptive_output_size(module, shape), average=True)


@register_lipschitz_bound(nn.AdaptiveMaxPool2d)
def _adaptive_max_pool(module: nn.AdaptiveMaxPool2d, shape) -> float:
    return adaptive_pooling_lipschitz_bound(shape[-2:], _adaptive_output_size(module, shape), average=False)


# 1-D pooling: the 2-D bounds with a window of height 1 (one window per sample on that axis).


def _single(value, default=None) -> int:
    """A 1-D pooling setting as torch reads it: ``2`` or ``(2,)``, or, for the stride only,
    ``None`` or empty for ``default`` (the kernel size)."""
    if default is not None and _unset_stride(value):
        return default
    if isinstance(value, tuple | list):
        if len(value) != 1:
            raise ValueError(f"expected an int or a 1-tuple, got {value!r}")
        value = value[0]
    return operator.index(value)


@register_lipschitz_bound(nn.MaxPool1d)
def _max_pool1d(module: nn.MaxPool1d, shape) -> float:
    kernel = _single(module.kernel_size)
    stride = _single(module.stride, kernel)
    return pooling_lipschitz_bound((1, kernel), (1, stride), (1, _single(module.dilation)))


@register_lipschitz_bound(nn.AvgPool1d)
def _avg_pool1d(module: nn.AvgPool1d, shape) -> float:
    """``sqrt(m) * sqrt(k) / k``, as for ``nn.AvgPool2d``."""
    kernel = _single(module.kernel_size)
    stride = _single(module.stride, kernel)
    if module.ceil_mode or (not module.count_include_pad and _single(module.padding)):
        raise LipschitzBoundError(module, "AvgPool1d with ceil_mode=True, or with padding and count_include_pad=False, "
                                          "divides some windows by fewer entries; use ceil_mode=False and "
                                          "count_include_pad=True")
    return sqrt_up(Fraction(window_multiplicity(kernel, stride), kernel))


def _adaptive_output_length(module, shape) -> int:
    out = module.output_size[0] if isinstance(module.output_size, tuple | list) else module.output_size
    return shape[-1] if out is None else int(out)


@register_lipschitz_bound(nn.AdaptiveAvgPool1d)
def _adaptive_avg_pool1d(module: nn.AdaptiveAvgPool1d, shape) -> float:
    return adaptive_pooling_lipschitz_bound((1, shape[-1]), (1, _adaptive_output_length(module, shape)), average=True)


@register_lipschitz_bound(nn.AdaptiveMaxPool1d)
def _adaptive_max_pool1d(module: nn.AdaptiveMaxPool1d, shape) -> float:
    return adaptive_pooling_lipschitz_bound((1, shape[-1]), (1, _adaptive_output_length(module, shape)), average=False)
