"""Convert an existing PyTorch model to lipnet layers, and say what still stands in the way.

:func:`convert` swaps every ``nn.Conv2d`` for a :class:`~lipnet.nn.GramConv2d`, every ``nn.Conv1d``
for a :class:`~lipnet.nn.GramConv1d`, every ``nn.ConvTranspose2d`` for a
:class:`~lipnet.nn.GramConvTranspose2d` and every ``nn.Linear`` for a :class:`~lipnet.nn.GramLinear`
(same arguments, same weights), and
optionally every ``nn.ReLU`` for :class:`~lipnet.nn.MaxMin`. It returns the converted copy
and a :class:`ConversionReport` listing each change and each module that keeps the model
from being certifiably 1-Lipschitz, with the 1-Lipschitz replacement lipnet offers.

Containers with their own ``forward`` (torchvision's ``ResNet`` and ``BasicBlock``, user
modules) are analysed with ``torch.fx``: :func:`traced_lipschitz_bound` bounds them from the
graph of their forward, and :func:`convert` registers it with
:func:`lipnet.certify.register_lipschitz_bound` for such types, so that
:func:`lipnet.certify.lipschitz_bound` can certify the converted model. Residual additions
are not compositions: ``x + f(x)`` is bounded by ``1 + Lip(f)``, so a network of ``k`` plain
residual blocks may have a bound of ``2^k``; the report says so.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lipnet.bounds.gram import DEFAULT_N_ITER
from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound, register_lipschitz_bound
from lipnet.certify.lipschitz import (
    _REGISTRY,
    _lookup,
    add_up,
    call_registered_bound,
    check_no_forward_hooks,
    check_runs_own_forward,
    mul_up,
)
from lipnet.certify.precision import UNIT_ROUNDOFF, example_norms, underflow_bound
from lipnet.export.exporter import check_input_shape, example_input
from lipnet.nn.activations import GroupSort, MaxMin
from lipnet.nn.gram_conv import GramConv2d
from lipnet.nn.gram_conv1d import GramConv1d
from lipnet.nn.gram_conv_transpose import GramConvTranspose2d
from lipnet.nn.gram_linear import GramLinear
from lipnet.nn.normalized import GramNormalizedConv
from lipnet.nn.pooling import pooling_lipschitz_bound, sqrt_up
from lipnet.nn.residual import ConvexResidual, GramResidualConv2d
from lipnet.nn.sequential import GramSequential

__all__ = ["Change", "Conversion", "ConversionReport", "Obstacle", "convert", "traced_lipschitz_bound"]

#: Values of ``convert(..., activation=...)``.
ACTIVATIONS = ("maxmin", None)


@dataclass(frozen=True)
class Change:
    """One module replaced by :func:`convert`: its path in the model, old and new ``repr``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Obstacle:
    """A module that keeps the converted model from being certifiably 1-Lipschitz.

    Attributes:
        path: where it is in the model (``""`` for the model itself).
        module: its type, ``module.qualname``.
        problem: what is wrong, and its known Lipschitz bound where it has one.
        fix: the suggested 1-Lipschitz replacement, or ``None`` when lipnet has none.
        blocking: ``True`` when no sound bound can be computed at all (not even a loose one).
    """

    path: str
    module: str
    problem: str
    fix: str | None
    blocking: bool


@dataclass
class ConversionReport:
    """What :func:`convert` changed, and what still keeps the model from a 1-Lipschitz certificate.

    Attributes:
        changes: the replaced modules.
        obstacles: modules that are not certifiably 1-Lipschitz (blocking: no bound at all;
            non-blocking: a sound bound above 1, or a condition such as eval mode).
        notes: everything else worth knowing (modules left unchanged and why).
        registered: module types whose bound :func:`convert` registered with
            :func:`lipnet.certify.register_lipschitz_bound` (:func:`traced_lipschitz_bound`).
        lipschitz_bound: :func:`lipnet.certify.lipschitz_bound` of the converted model at
            conversion time (weights change in training: certify again after it), or ``None``.
        bound_error: why no bound could be computed (``None`` when it was, or when no
            ``input_shape`` was given).
    """

    changes: list[Change] = field(default_factory=list)
    obstacles: list[Obstacle] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    lipschitz_bound: float | None = None
    bound_error: str | None = None

    @property
    def certifiable(self) -> bool:
        """Whether :func:`lipnet.certify.lipschitz_bound` bounded the converted model."""
        return self.lipschitz_bound is not None

    def __str__(self) -> str:
        lines = [f"Converted {len(self.changes)} module(s):"]
        lines += [f"  {c.path or '<model>'}: {c.old} -> {c.new}" for c in self.changes]
        groups: dict[tuple, list[str]] = {}
        for o in self.obstacles:
            groups.setdefault((o.blocking, o.module, o.problem, o.fix), []).append(o.path or "<model>")
        if groups:
            lines.append(f"{len(self.obstacles)} module(s) keep the model from being certifiably 1-Lipschitz:")
        for (blocking, module, problem, fix), paths in groups.items():
            where = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
            lines.append(f"  [{'no bound' if blocking else 'bound > 1'}] {module} at {where}: {problem}")
            if fix:
                lines.append(f"      fix: {fix}")
        if self.registered:
            lines.append("Registered lipnet.convert.traced_lipschitz_bound for: " + ", ".join(self.registered))
        lines += [f"Note: {note}" for note in self.notes]
        if self.lipschitz_bound is not None:
            lines.append(f"Certified Lipschitz bound of the converted model, as converted: {self.lipschitz_bound:.6g}")
        elif self.bound_error is not None:
            lines.append(f"Not certifiable as converted: {self.bound_error}")
        return "\n".join(lines)


class Conversion(NamedTuple):
    """Result of :func:`convert`; unpacks as ``model, report = convert(...)``."""

    model: nn.Module
    report: ConversionReport


def convert(
    model: nn.Module,
    *,
    activation: str | None = "maxmin",
    input_shape: Sequence[int] | None = None,
    replace: Mapping[type, Callable[[nn.Module], nn.Module]] | None = None,
    n_iter: int = DEFAULT_N_ITER,
    inplace: bool = False,
    certify: bool = True,
) -> Conversion:
    """Swap ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` (and ``nn.ReLU``) for lipnet
    layers, and report the rest.

    Args:
        model: any ``nn.Module`` tree (e.g. a torchvision model).
        activation: ``"maxmin"`` replaces each ``nn.ReLU`` by :class:`~lipnet.nn.MaxMin`
            (1-Lipschitz *and* gradient-norm preserving), which pairs the channels along a
            ``dim`` counted from the end (``-3`` after a 2-D convolution, ``-2`` after a 1-D
            one, ``-1`` after a linear layer), so that inputs with and without a batch
            dimension are paired alike. The layout is read from the layers before the ReLU in
            an ``nn.Sequential``, else from the rank of what it receives with ``input_shape``
            (its dim 1 in a batch); where neither tells, the MaxMin gets ``dim=1`` (the
            channels of a batch) and the report says so. A ReLU whose input has an odd number
            of channels is kept (ReLU is 1-Lipschitz too), and the report says so; without
            ``input_shape`` the channel counts cannot be checked and every ReLU is replaced.
            ``None`` keeps the ReLUs.
        input_shape: shape of one input without the batch dimension, e.g. ``(3, 32, 32)``.
            Enables the channel check above, the analysis of containers with their own
            forward, and the certified bound of the converted model in the report.
        replace: extra replacements ``{module type: fn(module) -> new module}``, applied
            first (the type and its subclasses), e.g. ``{nn.BatchNorm2d: lambda m: nn.Identity()}``
            or ``{nn.MaxPool2d: lambda m: L2NormPool2d(2)}``.
        n_iter: Gram iterations of the new layers.
        inplace: modify ``model`` itself instead of a deep copy (the returned model is
            ``model``, unless ``model`` is itself a layer that gets replaced).
        certify: with ``input_shape``, put :func:`lipnet.certify.lipschitz_bound` of the
            converted model in the report (float64 bounds of every layer: seconds for a
            ResNet-18 on a CPU, minutes for VGG's 25088 x 4096 dense layer).

    Returns:
        ``(model, report)``: the converted model (same device, dtype and train/eval mode,
        weights carried over) and its :class:`ConversionReport`.

    Only modules of exactly type ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` are
    converted; subclasses (which may have their own ``forward``) and layers with hooks or
    parametrizations are left alone and reported. Converting a pretrained model keeps its weights, but the Gram
    layers apply ``W / ||W||``, so the function changes: fine-tune it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        >>> converted, report = convert(net, input_shape=(3, 4, 4))
        >>> type(converted[0]).__name__, type(converted[2]).__name__
        ('GramConv2d', 'MaxMin')
        >>> [o.module for o in report.obstacles]
        ['torch.nn.BatchNorm2d']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    replace = dict(replace or {})
    for key, fn in replace.items():
        if not (isinstance(key, type) and issubclass(key, nn.Module)) or not callable(fn):
            raise TypeError(f"replace must map nn.Module types to callables, got {key!r}: {fn!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")

    report = ConversionReport()
    try:
        target = model if inplace else copy.deepcopy(model)
    except RuntimeError as error:  # a tensor attribute computed with autograd, as torch.nn.utils.weight_norm leaves
        raise ValueError(f"convert works on a copy of the model, and it cannot be copied ({error}); remove "
                         "torch.nn.utils.weight_norm (torch.nn.utils.remove_weight_norm, or use "
                         "torch.nn.utils.parametrizations.weight_norm), or pass inplace=True") from error
    shapes = _input_shapes(target, input_shape) if input_shape is not None else None
    if activation is not None and shapes is None:
        report.notes.append("input_shape not given: ReLU channel counts were not checked; MaxMin raises at the "
                            "first forward pass if a ReLU input has an odd number of channels")
    plan = _plan(target, activation, replace, n_iter, shapes, report)  # builds everything before changing anything
    for path, module in list(target.named_modules(remove_duplicate=False)):
        if path and id(module) in plan:
            target.set_submodule(path, plan[id(module)])
    target = plan.get(id(target), target)

    if input_shape is None:
        report.notes.append("input_shape not given: pass it to check every module against lipnet.certify, analyse "
                            "containers with their own forward and compute the certified bound")
        _diagnose(target, None, report)
        return Conversion(target, report)
    shapes = _input_shapes(target, input_shape)
    _register_traced_bounds(target, shapes, report)
    _diagnose(target, shapes, report)
    if certify:
        try:
            report.lipschitz_bound = lipschitz_bound(target, input_shape)
        except LipschitzBoundError as error:
            report.bound_error = str(error)
    return Conversion(target, report)


# ----------------------------------------------------------------------------- conversion


def _input_shapes(model: nn.Module, input_shape) -> dict[int, list[tuple[int, ...]]]:
    """Shapes (batch included) of the first tensor argument of every module call, by module ``id``.

    One eval-mode forward pass on a random batch of 2, without gradients; the train/eval
    modes are restored afterwards (in eval mode nothing else changes, except that the Gram
    layers cache their normalized weights, which later passes reuse).
    """
    shapes: dict[int, list[tuple[int, ...]]] = {}

    def record(module, args):
        if args and torch.is_tensor(args[0]):
            shapes.setdefault(id(module), []).append(tuple(args[0].shape))

    x = example_input(model, input_shape, batch=2, seed=0)
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as error:
        raise ValueError(f"the model does not accept inputs of shape (batch, {', '.join(map(str, input_shape))}): "
                         f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    return shapes


def _plan(model, activation, replace, n_iter, shapes, report) -> dict[int, nn.Module]:
    """``{id(old module): new module}``, and the report's changes and notes."""
    plan: dict[int, nn.Module] = {}
    opaque = _parametrizations(model)  # modules whose descendants are not visited
    layouts = _channel_dims(model) if activation == "maxmin" else {}
    unknown: list[str] = []  # ReLUs replaced by MaxMin(dim=1), their layout unknown
    for path, module in model.named_modules(remove_duplicate=False):
        if _inside(path, opaque):
            continue
        if id(module) not in plan:
            new = _replacement(path, module, activation, replace, n_iter, shapes, layouts, unknown, report)
            if new is None:
                if isinstance(module, (nn.MultiheadAttention, *_GRAM_LAYERS)):
                    opaque.append(path)  # uses its children's weights directly / already converted
                continue
            plan[id(module)] = new
        report.changes.append(Change(path, _short(module), _short(plan[id(module)])))
        opaque.append(path)
    if unknown:
        listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        report.notes.append(f"ReLU at {listed} replaced by MaxMin(dim=1), which pairs dim 1: the channels of a batch "
                            "(N, C, ...), but the second dimension of an input without a batch dimension. The layout "
                            "of the ReLU's input is unknown (no known layer before it in an nn.Sequential, and no "
                            "input_shape or inputs of several ranks): pass input_shape, or set the MaxMin's dim "
                            "counted from the end (-3 for (N, C, H, W) or (C, H, W), -2 for (N, C, L) or (C, L), -1 "
                            "for features)")
    return plan


def _parametrizations(model: nn.Module) -> list[str]:
    """The paths of the ``parametrizations`` of parametrized modules (``torch.nn.utils.parametrize``):
    modules that compute weights from parameters, not layers on the data path, so neither
    converted nor diagnosed (a parametrization called on a 0-dim parameter has no input shape)."""
    return [f"{path}.parametrizations" if path else "parametrizations"
            for path, module in model.named_modules(remove_duplicate=False)
            if torch.nn.utils.parametrize.is_parametrized(module)]


def _inside(path: str, prefixes: list[str]) -> bool:
    """Whether ``path`` is strictly below one of ``prefixes`` (``""`` is the root)."""
    return any((p == "" and path != "") or path.startswith(p + ".") for p in prefixes)


def _replacement(path, module, activation, replace, n_iter, shapes, layouts, unknown, report) -> nn.Module | None:
    """The module that replaces ``module`` at ``path``, or ``None``; notes in ``report``, and the
    paths of ReLUs whose channel layout is unknown (replaced by ``MaxMin(dim=1)``) in ``unknown``."""
    for cls in type(module).__mro__:
        if cls in replace:
            new = replace[cls](module)
            if not isinstance(new, nn.Module):
                raise TypeError(f"replace[{cls.__name__}] returned {type(new).__name__} for {path or 'the model'}, "
                                "not an nn.Module")
            return new
    if isinstance(module, _LINEAR) and not isinstance(module, _GRAM_LAYERS):
        reason = _unconvertible(module)
        if reason is not None:
            report.notes.append(f"{type(module).__name__} at '{path}' not converted: {reason}")
            return None
        try:
            return _gram_layer(module, n_iter)
        except ValueError as error:
            report.notes.append(f"{type(module).__name__} at '{path}' not converted: {error}")
            return None
    if activation == "maxmin" and type(module) is nn.ReLU:
        calls = None if shapes is None else shapes.get(id(module))
        if shapes is not None and not calls:
            report.notes.append(f"ReLU at '{path}' kept: it is not called on inputs of the given shape")
            return None
        dim = _maxmin_dim(layouts.get(id(module), {None}), calls)
        if calls and any(not -len(s) <= dim < len(s) or len(s) < 2 or s[dim] % 2 for s in calls):
            counts = sorted({s[dim] if -len(s) <= dim < len(s) and len(s) > 1 else 0 for s in calls})
            report.notes.append(f"ReLU at '{path}' kept: MaxMin pairs the channels along dim {dim} and this ReLU sees "
                                f"{', '.join(map(str, counts))} channel(s), an odd count (ReLU is 1-Lipschitz too, "
                                "just not gradient-norm preserving)")
            return None
        new = MaxMin(dim=dim)
        if dim == 1:
            unknown.append(repr(path))
        new.train(module.training)
        return new
    return None


#: ``(types, dim)``: where the channels of these modules' output are, counted from the end (the
#: same for inputs with and without a batch dimension).
_OUTPUT_CHANNELS = (
    ((nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout2d), -3),
    ((nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.Dropout1d), -2),
    ((nn.Linear,), -1),
)
#: Modules whose output has the layout of their input.
_SAME_LAYOUT = (nn.ReLU, MaxMin, nn.Identity, nn.Dropout)


def _channel_dims(model: nn.Module) -> dict[int, set[int | None]]:
    """Where the channels of each module's input are, counted from the end, by module ``id``: a set
    (a module may be called in several places) holding ``None`` where the layout is unknown.

    Only ``nn.Sequential`` (and :class:`~lipnet.nn.GramSequential`) are known to pass the output of
    a child to the next; the input of the model and of other containers' children is unknown.
    """
    dims: dict[int, set[int | None]] = {}

    def visit(module: nn.Module, dim: int | None) -> int | None:
        """Records ``dim`` for ``module``'s input and returns its output's."""
        dims.setdefault(id(module), set()).add(dim)
        children = [child for child in module._modules.values() if child is not None]
        if isinstance(module, nn.Sequential) and type(module).forward in (nn.Sequential.forward,
                                                                          GramSequential.forward):
            for child in children:
                dim = visit(child, dim)
            return dim
        for child in children:
            visit(child, None)
        if isinstance(module, _SAME_LAYOUT):
            return dim
        return next((out for types, out in _OUTPUT_CHANNELS if isinstance(module, types)), None)

    visit(model, None)
    return dims


def _maxmin_dim(layouts: set[int | None], calls) -> int:
    """The ``dim`` of the MaxMin that replaces a ReLU: where its input's channels are, counted from
    the end, from the layers before it (``layouts``) or else from the rank of the inputs it
    receives (``calls``, batch included: the channels are dim 1); ``1`` where neither tells. A
    layout that would be the batch dimension of an input it receives (``MaxPool2d`` pools an
    ``(N, H, W)`` batch as one ``(C, H, W)`` input: its "channels", ``-3``, are the examples)
    gives way to the rank: MaxMin must never pair examples."""
    ranks = {len(shape) for shape in calls or ()}
    if len(layouts) == 1 and None not in layouts:
        dim = next(iter(layouts))
        if not any(dim % rank == 0 for rank in ranks):
            return dim
    if len(ranks) == 1 and (rank := ranks.pop()) >= 2:
        return 1 - rank
    return 1


def _unconvertible(module: nn.Module) -> str | None:
    """Why an ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` cannot be swapped for a Gram
    layer, or ``None``."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "it has parametrizations (remove them first, e.g. torch.nn.utils.parametrize.remove_parametrizations)"
    if type(module) not in _LINEAR:
        return (f"{type(module).__qualname__} subclasses {type(module).__mro__[1].__name__} and may have its own "
                "forward (convert it by hand, or with replace=...)")
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "it has hooks, which would be lost (remove them, convert, then register them again)"
    if module.weight.is_meta:
        return "its weight is on the meta device (materialize the model first)"
    return None


def _gram_layer(module: nn.Module, n_iter: int) -> nn.Module:
    factory = dict(device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(module, nn.ConvTranspose2d):
        new = GramConvTranspose2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                  module.padding, module.output_padding, module.groups, module.bias is not None,
                                  module.dilation, module.padding_mode, n_iter=n_iter, **factory)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        new = (GramConv1d if isinstance(module, nn.Conv1d) else GramConv2d)(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, module.groups, module.bias is not None,
                         module.padding_mode, n_iter=n_iter, **factory)
    else:
        new = GramLinear(module.in_features, module.out_features, module.bias is not None, n_iter=n_iter, **factory)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old = getattr(module, name)
            if old is not None:
                getattr(new, name).copy_(old)
                getattr(new, name).requires_grad_(old.requires_grad)
    new.train(module.training)
    return new


def _short(module: nn.Module) -> str:
    text = repr(module)
    return text if "\n" not in text else f"{type(module).__name__}(...)"


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    prefix = "torch.nn" if cls.__module__.startswith("torch.nn.modules") else cls.__module__
    return f"{prefix}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- diagnosis

#: The layer types :func:`convert` swaps for Gram layers (exact types), and the Gram layers.
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_GRAM_LAYERS = (GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear)
_POOL_FIX = ("lipnet.nn.L2NormPool2d(k) or lipnet.nn.ScaledAvgPool2d(k), stride k (non-overlapping windows: "
             "1-Lipschitz), e.g. replace={nn.MaxPool2d: lambda m: L2NormPool2d(2)}")
_RESIDUAL_FIX = ("lipnet.nn.GramResidualConv2d (bounds I + conv itself: 1-Lipschitz) or lipnet.nn.ConvexResidual "
                 "((1 - a) x + a f(x): 1-Lipschitz when f is)")
_ATTENTION = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
              nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_ATTENTION_PROBLEM = "dot-product attention is not Lipschitz (Kim, Papamakarios, Mnih, ICML 2021)"

#: Activations with a bound in lipnet.certify that depends on the module alone (may exceed 1, or be refused).
_BOUNDED_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.CELU, nn.SELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.PReLU, nn.RReLU, nn.Threshold, nn.Hardshrink)
_ACTIVATION_FIX = "lipnet.nn.MaxMin (convert(..., activation='maxmin') replaces nn.ReLU only)"
#: Modules whose bound training changes without constraint: reported even while it is at most 1.
_UNCONSTRAINED = (nn.modules.batchnorm._BatchNorm,)
#: ``(types, problem, fix)``: what is known to be wrong with a module type, and the way out.
_ADVICE = (
    (nn.modules.batchnorm._BatchNorm,
     "scales each channel by weight / sqrt(running_var + eps), a factor that training leaves unconstrained, and "
     "normalizes by batch statistics in train mode",
     "remove it: Gram layers need no normalization (replace={nn.BatchNorm2d: lambda m: nn.Identity()}); to keep a "
     "pretrained scale, fold it into the previous convolution before converting "
     "(torch.nn.utils.fusion.fuse_conv_bn_eval)"),
    ((nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm),
     "divides by a statistic of its input, which is not Lipschitz near zero variance",
     "remove it (replace={<its type>: lambda m: nn.Identity()})"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.LPPool1d, nn.LPPool2d),
     "pooling that is not 1-Lipschitz (overlapping windows put inputs in several windows)", _POOL_FIX),
    (_ATTENTION, _ATTENTION_PROBLEM, None),
    (_BOUNDED_ACTIVATIONS, "an activation that is not 1-Lipschitz", _ACTIVATION_FIX),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU), "an activation with no bound in lipnet.certify",
     _ACTIVATION_FIX),
    ((nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.Bilinear, nn.Embedding),
     "a linear layer that lipnet has no Gram normalization for", None),
)
#: lipnet and torch modules that are 1-Lipschitz by construction (exact types: a subclass may
#: change the forward, and is checked against lipnet.certify instead).
_ONE_LIPSCHITZ_MODULES = (*_GRAM_LAYERS, GramResidualConv2d, MaxMin, GroupSort, nn.ReLU, nn.Identity, nn.Flatten)

#: 1-Lipschitz types that lipnet.certify refuses where they act on the batch dimension
#: (``nn.Flatten(0, ...)``, ``MaxMin(dim=0)``, ``GroupSort(k, dim=0)``): checked like the others.
_MAY_ACT_ON_THE_BATCH = (nn.Flatten, MaxMin, GroupSort)

#: Bounds up to this count as 1 (they are 1 up to the rounding margins of float64 bounds).
_ONE = 1 + 1e-6
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _diagnose(model: nn.Module, shapes, report: ConversionReport) -> None:
    """Add an :class:`Obstacle` for every module that is not certifiably 1-Lipschitz.

    With ``shapes`` (an ``input_shape`` was given), each module called in the forward pass
    is checked against :func:`lipnet.certify.lipschitz_bound` for the input shape it sees:
    an error is a blocking obstacle, a bound above 1 a non-blocking one. Containers with
    their own forward are traced for residual sums. Without shapes, known problem types
    are reported from their type alone.
    """
    opaque = _parametrizations(model)
    for path, module in model.named_modules():
        if _inside(path, opaque):
            continue
        if isinstance(module, _LINEAR + _ATTENTION) or callable(getattr(module, "lipschitz_bound",
                                                                                       None)):
            opaque.append(path)  # analysed as a whole
        obstacle = _obstacle(path, module, shapes)
        if obstacle is not None:
            report.obstacles.append(obstacle)


def _obstacle(path: str, module: nn.Module, shapes) -> Obstacle | None:
    name = _qualname(module)
    if type(module) in _ONE_LIPSCHITZ_MODULES and not isinstance(module, _MAY_ACT_ON_THE_BATCH):
        return None
    if isinstance(module, _DROPOUT):
        if not module.training:
            return None
        return Obstacle(path, name, "random in train mode: certificates hold for the eval-mode model (lipnet.certify "
                        "evaluates in eval mode, where dropout is the identity)", "call model.eval() before "
                        "certifying", blocking=False)
    if isinstance(module, _LINEAR):
        return Obstacle(path, name, "an unnormalized linear layer (see the notes for why it was not converted)",
                        "lipnet.nn.GramConv2d / lipnet.nn.GramConv1d / lipnet.nn.GramConvTranspose2d / "
                        "lipnet.nn.GramLinear", blocking=True)
    if _is_custom_container(module):
        return _container_obstacle(path, module, shapes)
    if isinstance(module, (nn.Sequential, ConvexResidual)) or type(module).__name__ == "InputNormalization":
        return None  # composed from their children / a bound > 1 by design (certificates in pixel space)
    problem, fix = next(((p, f) for types, p, f in _ADVICE if isinstance(module, types)), (None, None))
    calls = shapes.get(id(module)) if shapes is not None else None
    if calls is None and (shapes is not None or problem is None):
        return None  # not called by the forward pass / nothing known from the type alone
    try:
        if calls is not None:
            bound = max(lipschitz_bound(module, shape[1:]) for shape in calls)
        elif (bound := _bound_from_module(module)) is None:
            return Obstacle(path, name, problem, fix, blocking=True)
    except LipschitzBoundError as error:
        reason = "" if isinstance(error, UnknownModuleError) or problem is None else f" ({error.reason})"
        return Obstacle(path, name, (problem or f"lipnet.certify has no Lipschitz bound for it ({error.reason})") +
                        reason, fix or "replace it by a lipnet layer, or register a sound bound with "
                        "lipnet.certify.register_lipschitz_bound", blocking=True)
    if isinstance(module, _UNCONSTRAINED):
        return Obstacle(path, name, f"{problem}: Lipschitz bound {bound:.4g} with its current values, which training "
                        "may raise above 1", fix, blocking=False)
    if bound > _ONE:
        return Obstacle(path, name, f"{problem + ': ' if problem else ''}Lipschitz bound {bound:.4g}, not 1", fix,
                        blocking=False)
    return None


def _bound_from_module(module: nn.Module) -> float | None:
    """The bound of a module whose bound does not depend on its input's shape (max pooling,
    BatchNorm, the activations of :data:`_BOUNDED_ACTIVATIONS`), or ``None`` for the others;
    raises :class:`LipschitzBoundError` when lipnet.certify refuses it."""
    if isinstance(module, nn.MaxPool2d):
        return pooling_lipschitz_bound(module.kernel_size, module.stride, module.dilation)
    if isinstance(module, _BOUNDED_ACTIVATIONS + _UNCONSTRAINED):
        bound = _lookup(_REGISTRY, module)
        if bound is None:  # a subclass with its own forward
            raise UnknownModuleError(module)
        return call_registered_bound(bound, module, ())
    return None


def _is_custom_container(module: nn.Module) -> bool:
    """A module with children whose bound lipnet.certify cannot derive from theirs by itself."""
    if not any(True for _ in module.children()) or callable(getattr(module, "lipschitz_bound", None)):
        return False
    for known in (GramSequential, nn.Sequential, ConvexResidual):  # most derived first
        if isinstance(module, known):
            return type(module).forward is not known.forward
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _container_obstacle(path: str, module: nn.Module, shapes) -> Obstacle | None:
    """A container with its own forward: its residual sums, or why it cannot be analysed."""
    name = _qualname(module)
    if isinstance(module, _ATTENTION):
        return Obstacle(path, name, _ATTENTION_PROBLEM, None, blocking=True)
    try:
        graph = _trace(module).graph
    except Exception as error:
        return Obstacle(path, name, f"its forward cannot be traced by torch.fx ({type(error).__name__}: {error}), so "
                        "how it combines its children is unknown", "register a sound bound with "
                        "lipnet.certify.register_lipschitz_bound, or rebuild it from lipnet containers", blocking=True)
    sums = [node for node in graph.nodes
            if _key(node) in _SUMS and sum(_depends_on_input(a) for a in _tensor_args(node)) > 1]
    calls = shapes.get(id(module)) if shapes is not None else None
    own = 1.0  # the bound of its forward's own operations, children counted as 1-Lipschitz
    if calls:
        # Check the operations of its forward only: children get bound 1 here (they are diagnosed on their own).
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            own = max(_traced_bound(module, shape[1:], child_bound=lambda child, shape: 1.0)
                      for shape in dict.fromkeys(calls))
        except LipschitzBoundError as error:
            return Obstacle(path, name, f"its Lipschitz bound cannot be derived from its forward: {error.reason}",
                            "register a sound bound with lipnet.certify.register_lipschitz_bound, or rebuild it "
                            "from lipnet containers", blocking=True)
        finally:
            for m, training in modes.items():
                m.train(training)
    if sums:
        return Obstacle(path, name, f"adds {len(sums)} pair(s) of branches computed from its input (a residual "
                        "connection): a sum is bounded by the sum of the branches' bounds, x + f(x) by 1 + Lip(f), "
                        "2 for a 1-Lipschitz f, so k such blocks in a row can give 2^k" +
                        (f"; its forward's bound with 1-Lipschitz children is {own:.4g}" if calls else ""),
                        _RESIDUAL_FIX, blocking=False)
    if own > _ONE:
        return Obstacle(path, name, f"its forward scales or copies values (constant factors, concatenations of a "
                        f"value with itself): Lipschitz bound {own:.4g} with 1-Lipschitz children, not 1",
                        "scale by factors of at most 1, and concatenate distinct values (or divide their copies by "
                        "sqrt(number of copies))", blocking=False)
    return None


# ----------------------------------------------------------------------------- traced bounds


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Trace one module's own forward: every submodule call is a leaf."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """The graph of ``module.forward`` with its children as leaves, as a ``GraphModule``; extra
    arguments take their defaults. torch.fx stores the tensors the forward creates as attributes
    of the module it traces (``_tensor_constant0``, ...): they are copied into the GraphModule
    and removed from the module, which would otherwise gain one per trace."""

    parameters = list(inspect.signature(module.forward).parameters.values())
    if not parameters or parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError("forward must take the input tensor as its first argument")
    concrete = {}
    for p in parameters[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"forward takes a second required argument {p.name!r}: only one input is supported")
        concrete[p.name] = p.default
    before = set(vars(module))
    try:
        traced = torch.fx.GraphModule(module, _ChildrenAsLeaves().trace(module, concrete_args=concrete or None))
    finally:
        created = set(vars(module)) - before
        for name in created:
            delattr(module, name)
    traced.created_attributes = frozenset(created)
    return traced


_SUMS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
_SCALINGS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv, operator.itruediv, torch.div,
             "div", "div_"}
_ONE_LIPSCHITZ = {torch.relu, F.relu, "relu", "relu_", torch.tanh, F.tanh, "tanh", F.hardtanh, operator.neg,
                  torch.neg, "neg", F.dropout}
_REARRANGEMENTS = {torch.flatten, "flatten", "view", "reshape", torch.reshape, "permute", torch.permute,
                   "transpose", torch.transpose, "contiguous", "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze,
                   "clone"}
_SPLITS = {torch.chunk, "chunk", torch.split, "split", torch.unbind, "unbind"}
_CATS = {torch.cat, torch.concat}
#: Elementwise operations: applied to constants that are the same for every example, they give such constants.
_ELEMENTWISE = _SUMS | _SCALINGS | (_ONE_LIPSCHITZ - {F.dropout}) | {"to"}
#: Factories whose first argument (or ``size=``) is a size: a shape passed there sets no value.
_FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty}
_SHAPE_METHODS = ("size", "dim", "numel")
_SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device")


def _key(node: torch.fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _is_sum(node: torch.fx.Node) -> bool:
    return _key(node) in _SUMS


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _depends_on_input(node: torch.fx.Node) -> bool:
    """Whether a node's value can depend on the values of the graph's input."""
    return _reaches_input(node, lambda n: (n.op == "call_method" and n.target in _SHAPE_METHODS) or (
        n.target is getattr and len(n.args) == 2 and n.args[1] in _SHAPE_ATTRIBUTES))


def _reads_input_shape(node: torch.fx.Node) -> bool:
    """Whether a node's value can depend on the shape of a value that depends on the input (its
    batch size, for one: ``x.shape[0]``, ``x.size(0)``, ``x.numel()``, ``len(x)``)."""
    return _reaches_input(node, lambda n: False)


def _reaches_input(node: torch.fx.Node, cut) -> bool:
    """Whether the graph's input is among the arguments of ``node``, followed back through
    every node except those for which ``cut(node)`` holds."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or cut(n):
            continue
        seen.add(n)
        if _is_input(n):
            return True
        stack.extend(_tensor_args(n))
    return False


def _is_input(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the input of its graph: its first placeholder (the others are the extra
    arguments of ``forward``, at their defaults)."""
    return node.op == "placeholder" and node is next(iter(node.graph.nodes))


_IN_PLACE_OPERATIONS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
                        "lshift", "rshift")
#: ``a += b`` and friends, ``a[i] = b``: they write into their first argument.
_IN_PLACE_OPERATORS = {getattr(operator, f"i{name}") for name in _IN_PLACE_OPERATIONS} | {operator.setitem}
_IN_PLACE_DUNDERS = {f"__i{name}__" for name in _IN_PLACE_OPERATIONS} | {"__setitem__"}
#: In-place methods that change the size or memory of a tensor, not only its values.
_MEMORY_CHANGES = {"resize_", "resize_as_", "set_", "as_strided_", torch.Tensor.resize_, torch.Tensor.resize_as_,
                   torch.Tensor.set_, torch.Tensor.as_strided_}


def _writes_into_first_argument(node: torch.fx.Node, module: nn.Module) -> bool:
    """Whether a node writes into the tensor of its first argument: a method or function whose
    name ends in ``_`` (``mul_``, ``torch.relu_``), ``a += b``, ``a[i] = b``, ``inplace=True``
    given by keyword or position, or a child with an in-place module anywhere inside it (an
    ``nn.Sequential`` ending in ``ReLU(inplace=True)`` writes into its input as well)."""
    if node.op == "call_module":
        return any(getattr(m, "inplace", False) is True for m in module.get_submodule(node.target).modules())
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in _IN_PLACE_OPERATORS or name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
        return True
    inplace = node.kwargs.get("inplace", False)
    if "inplace" not in node.kwargs and node.op == "call_function":
        try:
            inplace = inspect.signature(target).bind(*node.args, **node.kwargs).arguments.get("inplace", False)
        except (TypeError, ValueError):  # no signature (a builtin) or other arguments: no inplace argument
            inplace = False
    return isinstance(inplace, torch.fx.Node) or bool(inplace)


def _leaves(value) -> list:
    """The values in nested lists, tuples (``torch.Size``) and dicts."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _tensors(value) -> list[torch.Tensor]:
    return [v for v in _leaves(value) if torch.is_tensor(v)]


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter of a tensor (bumped by every in-place write into its memory); None for
    an inference tensor, which has none (and cannot be written into outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing into ``a`` may change ``b``: the same tensor, or the same memory block
    (a view, or a tensor whose memory cannot be read, counts as shared)."""
    if a is b:
        return True
    try:
        if a.layout != torch.strided or b.layout != torch.strided:
            return True
        first, second = a.untyped_storage(), b.untyped_storage()
        return first.nbytes() > 0 and a.device == b.device and first.data_ptr() == second.data_ptr()
    except (RuntimeError, NotImplementedError):
        return True


def traced_lipschitz_bound(module: nn.Module, input_shape) -> float:
    """Sound Lipschitz bound of a module with its own ``forward``, from its ``torch.fx`` graph.

    The forward is traced with every child as a leaf, run in eval mode on batches of sizes 2
    and 3 (to see which operations keep the batch dimension) and 1 (where ``contiguous()`` or a
    reshape may return its input, and ``squeeze()`` drop the batch), and each node ``v`` gets a
    bound ``L(v)`` on the Lipschitz constant of its value as a function of the input:

    * input: 1; constants (parameters read directly, shapes): 0;
    * child ``m`` applied to ``u``: ``lipschitz_bound(m, shape of u) * L(u)``;
    * ``u + w``, ``u - w``: ``L(u) + L(w)`` (triangle inequality; no broadcasting of a
      non-constant operand, which would copy entries; ``alpha`` as applied, like the factors below);
    * ``c * u``, ``u / c`` with ``c`` a constant number or tensor: ``max|c| L(u)``,
      ``L(u) / min|c|`` (not a number read from the input's shape, such as its batch size;
      ``c`` as it was before the product, which ``c.mul_(u)`` overwrites, and as the product
      applies it, cast to its dtype and to float32 for half precisions);
    * ReLU, tanh, hardtanh, negation, eval-mode dropout: ``L(u)``;
    * per-example rearrangements (flatten, view, reshape, permute, transpose, squeeze,
      unsqueeze, contiguous, clone) and selections (chunk, split and unbind along a non-batch
      dimension, basic slicing): ``L(u)``, provided every tensor involved keeps the batch as
      its first dimension, and no size or dimension they are given is computed from the batch
      size (it may be given as read, ``x.shape[0]``, ``x.size(0)`` or ``x.shape``, as the first
      size of a view or reshape: ``(x.shape[0] - 1) % 3 + 1`` is the batch size at the traced
      batches only);
    * concatenation along a non-batch dimension: ``sqrt(sum L(u_i)^2)``.

    Any other operation raises :class:`~lipnet.certify.LipschitzBoundError`; so do a
    rearrangement given anything but sizes and dimensions (``view(dtype)`` reinterprets bits),
    a write into the input, a parameter, a buffer or an attribute (``out=``, in-place methods,
    ``resize_``), an in-place operation on a value used elsewhere or on a tensor whose memory a
    value read later shares (``contiguous()``, ``nn.Identity`` and no-op reshapes return their
    input), reading a value after anything changed it in place, a module with forward hooks
    or a ``forward`` assigned to the instance (the graph is the class's forward, without them),
    a forward that assigns attributes of the module or of its children (the graph freezes the
    Python values the forward reads: a flag a child sets from its input, a call counter), and a
    graph that does not reproduce the module's output. All float arithmetic rounds upwards.

    The graph holds the forward's tensor operations only: Python values it reads (attributes,
    globals) are those at tracing, and the graph is compared with the forward on three batches
    here, and on the inputs certified by the certification pass (``propagate_rounding``). A
    Python value that only other inputs would change (a flag a child sets for inputs above
    some size) is not caught.

    Args:
        module: e.g. a torchvision ``BasicBlock``.
        input_shape: shape of one input without the batch dimension.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        return _traced_bound(module, tuple(int(s) for s in input_shape))
    finally:
        for m, training in modes.items():
            m.train(training)


def _traced_bound(module: nn.Module, input_shape: tuple[int, ...], child_bound=lipschitz_bound) -> float:
    """:func:`traced_lipschitz_bound` in eval mode; ``child_bound(child, shape)`` bounds the leaves."""
    # torch.fx traces the class's forward, without hooks; the module must compute exactly that
    # (the check of the graph against the forward tolerates differences of 1e-6).
    check_no_forward_hooks(module)
    check_runs_own_forward(module)
    try:
        traced = _trace(module)
    except Exception as error:
        raise LipschitzBoundError(module, f"its forward cannot be traced by torch.fx ({type(error).__name__}: "
                                          f"{error}); register a bound with lipnet.certify.register_lipschitz_bound"
                                  ) from error
    cache: dict = {}
    writes = _AttributeWrites(module)

    def cached_child_bound(child, shape):
        key = (id(child), shape)
        if key not in cache:
            with writes.paused():  # (lipschitz_bound sets and restores the children's training flags)
                cache[key] = child_bound(child, shape)
        return cache[key]

    bounds = {}
    # Batch 1 last: there operations may return their input (contiguous() of x[:, 1:2], a reshape
    # that is a view only when the batch has one example), so an in-place write may reach a value
    # read later, and squeeze() may take the batch away. Its bound is checked, not used.
    for batch in (2, 3, 1):
        run = _BoundInterpreter(traced, module, batch, cached_child_bound)
        x = example_input(module, input_shape, batch=batch, seed=batch)
        with torch.no_grad(), writes.watching():
            out = run.run(x.clone())
            expected = module(x.clone())
        if not (torch.is_tensor(out) and torch.is_tensor(expected) and out.shape == expected.shape
                and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)):
            raise LipschitzBoundError(module, "the torch.fx graph of its forward does not reproduce its output "
                                              "(in-place operations on shared tensors?); register a bound with "
                                              "lipnet.certify.register_lipschitz_bound")
        bounds[batch] = run.result
    return bounds[3]


#: Held while nn.Module's attribute methods are patched: two threads certifying at once would
#: otherwise each restore what the other patched (one missing writes, one leaving its wrapper in).
_PATCHING = threading.RLock()

#: The attributes a Gram convolution assigns in its forward (the size of the input it received).
_FORWARD_NOTES = ("_last_input_size",)


class _AttributeWrites:
    """Refuses a forward that assigns an attribute of the module or of a descendant, seen by
    ``nn.Module.__setattr__`` and ``__delattr__``, patched while the forward runs
    (:meth:`watching`, as torch.fx patches ``nn.Module.__getattr__`` while it traces), except
    while the bounds of children are computed (:meth:`paused`).

    The graph freezes every Python value its forward reads when it is traced: a flag that a child
    sets from its input (``self.large = bool(x.abs().max() > 50)``, read by the parent as ``if
    self.gate.large: y = 100 * y``) or a call counter (``self.step += 1``, or one kept on a child,
    ``self.relu.calls += 1``) may take the forward down another branch than the graph's at the
    next call. The one attribute lipnet's layers assign in forward is the input size a Gram
    convolution notes (:data:`_FORWARD_NOTES`), which no forward branches on."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.tree = {id(m) for m in module.modules()}
        self.writes: list[tuple[nn.Module, str]] = []
        self.active = False

    def _note(self, module: nn.Module, name: str):
        if self.active and id(module) in self.tree and not (
                isinstance(module, GramNormalizedConv) and name in _FORWARD_NOTES):
            self.writes.append((module, name))

    @contextmanager
    def watching(self):
        with _PATCHING:
            # torch's methods, or an outer watcher's (a traced container inside another)
            set_attribute, delete_attribute = nn.Module.__setattr__, nn.Module.__delattr__

            def recording_set(module, name, value):
                self._note(module, name)
                set_attribute(module, name, value)

            def recording_delete(module, name):
                self._note(module, name)
                delete_attribute(module, name)

            nn.Module.__setattr__, nn.Module.__delattr__ = recording_set, recording_delete
            self.active = True
            try:
                yield
            finally:
                self.active = False
                nn.Module.__setattr__, nn.Module.__delattr__ = set_attribute, delete_attribute
        if self.writes:
            owner, name = self.writes[0]
            raise LipschitzBoundError(self.module, (
                f"its forward assigns the attribute {name!r} of a {type(owner).__qualname__} while it runs: the "
                "torch.fx graph freezes the Python values the forward reads when it is traced (a flag a child sets "
                "from its input, a call counter), so the forward may take another branch than the graph's at the next "
                "call; keep such state out of forward, or register a bound with "
                "lipnet.certify.register_lipschitz_bound"))

    @contextmanager
    def paused(self):
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


class _BoundInterpreter(torch.fx.Interpreter):
    """Runs the graph and propagates the bounds of :func:`traced_lipschitz_bound`."""

    def __init__(self, traced: torch.fx.GraphModule, module: nn.Module, batch: int, child_bound, keep_values=False):
        super().__init__(traced, garbage_collect_values=not keep_values)
        self.module = module  # attributes are read from the module itself: a child may replace them
        self.traced = traced
        self.batch = batch
        self.child_bound = child_bound
        self.bound: dict[torch.fx.Node, float] = {}
        # How each node's bound was composed, for the rounding error (_traced_rounding):
        # ("input",), ("constant",), ("child", child, u), ("linear", [(u, factor), ...]), ("exact", u), ("cat", [u, ...])
        self.rule: dict[torch.fx.Node, tuple] = {}
        self.result: float | None = None
        self.position = {node: i for i, node in enumerate(traced.graph.nodes)}
        # Version counters of each node's tensors when it ran (an in-place write anywhere in their
        # memory bumps them), and the tensors no node may write into (set by run).
        self.versions: dict[torch.fx.Node, list[int | None]] = {}
        self.protected: list[tuple[torch.Tensor, int | None, str]] = []
        self.attributes: dict[torch.fx.Node, object] = {}
        # Numbers read from the shape of a value that depends on the input (x.shape[0], x.numel()),
        # and constants whose values may depend on the batch size or on an example's position in
        # the batch (torch.ones(x.shape).cumsum(0)): no factor may be computed from either.
        self.shape_numbers: set[torch.fx.Node] = set()
        # Constants of the input's shape that are the same for every example: a factory given that
        # shape (torch.full(x.shape, 2.0)), then elementwise operations only.
        self.batch_constants: set[torch.fx.Node] = set()
        # Numbers and sizes that depend on the batch size, and those that are the batch size as read
        # from a shape (_note_batch_number): only the latter may give the batch size to a view or reshape.
        self.batch_numbers: set[torch.fx.Node] = set()
        self.batch_sizes: set[torch.fx.Node] = set()
        # The values of constant factors that in-place products overwrite, as they were before (_keep_factor).
        self.overwritten_factors: dict[torch.fx.Node, torch.Tensor] = {}

    def fail(self, node: torch.fx.Node, reason: str):
        raise LipschitzBoundError(self.module, f"node {node.format_node()}: {reason}")

    def fetch_attr(self, target: str):
        """An attribute of the module, or a tensor its forward creates (kept by the GraphModule, see
        :func:`_trace`)."""
        if target in getattr(self.traced, "created_attributes", ()):
            return getattr(self.traced, target)
        return super().fetch_attr(target)

    def run(self, x: torch.Tensor):
        """Run on ``x`` outside inference mode (whose tensors have no version counters and cannot
        be written into), noting the tensors that no node may write into: the input, the module's
        parameters and buffers and the attributes its graph reads."""
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
            self.protected = [(tensor, _version(tensor), f"its parameter or buffer {name!r}") for name, tensor in
                              [*self.module.named_parameters(), *self.module.named_buffers()]]
            self.attributes = {node: self.fetch_attr(node.target) for node in self.graph.nodes if node.op == "get_attr"}
            self.protected += [(value, _version(value), f"its attribute {node.target!r}")
                               for node, value in self.attributes.items() if torch.is_tensor(value)]
            return super().run(x)

    def run_node(self, node: torch.fx.Node):
        if node.op in ("call_function", "call_method", "call_module", "output"):
            self._check_reads(node)
        if node.op in ("call_function", "call_method", "call_module"):
            self._check_writes(node)
            self._keep_factor(node)
        value = super().run_node(node)
        if node.op == "placeholder" and torch.is_tensor(value):
            self.protected.append((value, _version(value), "the input"))
        self._check_state(node, value)
        self.versions[node] = [_version(t) for t in _tensors(value)]
        if isinstance(value, (int, float, torch.SymInt, torch.SymFloat, torch.Size)) and not isinstance(value, bool) and \
                _reads_input_shape(node):
            self.shape_numbers.add(node)
        if node.op == "output":
            (out,) = node.args
            if not isinstance(out, torch.fx.Node) or not torch.is_tensor(self.env[out]):
                self.fail(node, "the forward must return one tensor")
            self.result = self.bound[out]
        else:
            try:
                self._note_batch_number(node, value)
                self.bound[node] = self._node_bound(node, value)
            except LipschitzBoundError:
                raise
            except Exception as error:  # a rule given values of kinds it does not take: refused, not a crash
                self.fail(node, f"its arguments are not of the kinds its Lipschitz rule takes ({type(error).__name__}: "
                                f"{error})")
            if self.bound[node] == 0 and node.op in ("call_function", "call_method", "call_module"):
                self._note_batch_constant(node)
        return value

    def _note_batch_constant(self, node: torch.fx.Node):
        """Track the constants built from a factory of the input's shape: the same for every
        example while only elementwise operations act on them; anything else (``cumsum(0)``,
        ``sum(0)``, indexing, ``torch.empty``'s arbitrary values) may give each position in the
        batch, or each batch size, its own values, so such a constant counts as a shape number."""
        size = (node.args[0] if node.args else node.kwargs.get("size")) if _key(node) in _FACTORIES else None
        sizes: list[torch.fx.Node] = []
        torch.fx.node.map_arg(size, lambda n: sizes.append(n) or n)
        if any(_reads_input_shape(n) for n in sizes):
            (self.batch_constants if node.target is not torch.empty else self.shape_numbers).add(node)
        elif any(a in self.batch_constants for a in _tensor_args(node)):
            (self.batch_constants if _key(node) in _ELEMENTWISE else self.shape_numbers).add(node)
        # A write into a constant (c.mul_(x.shape[0]), c[3:].mul_(100) on c = torch.ones(x.shape))
        # changes every value in the same memory: if it reads a shape number, or writes into a
        # constant of the input's shape otherwise than elementwise on all of it, all of them count
        # as shape numbers.
        operand = node.args[0] if node.args else None
        if not (isinstance(operand, torch.fx.Node) and torch.is_tensor(self.env.get(operand)) and
                _writes_into_first_argument(node, self.module)):
            return
        written = self.env[operand]
        sharing = [other for other, value in self.env.items() if self.bound.get(other, 0.0) == 0 and
                   any(_shares_memory(written, t) for t in _tensors(value))]
        whole = operand in self.batch_constants and _key(node) in _ELEMENTWISE
        if self._reads_shape_number(node) or not whole and any(other in self.batch_constants for other in sharing):
            for other in (*sharing, node):
                self.batch_constants.discard(other)
                self.shape_numbers.add(other)

    def _check_writes(self, node: torch.fx.Node):
        """Refuse, before it runs, a node that writes into a tensor whose values the bounds take as given."""
        if "out" in node.kwargs:
            self.fail(node, "writes its result into an existing tensor (out=...), which other nodes may read as a "
                            "constant; use the returned value")
        if node.op in ("call_function", "call_method") and node.target in _MEMORY_CHANGES:
            self.fail(node, "changes the size or memory of a tensor in place (resize_, set_); build a new tensor")
        if not (_writes_into_first_argument(node, self.module) and node.args and
                isinstance(node.args[0], torch.fx.Node) and torch.is_tensor(self.env[node.args[0]])):
            return
        operand = node.args[0]
        written = self.env[operand]
        for tensor, _, what in self.protected:
            if _shares_memory(written, tensor):
                self.fail(node, f"an in-place operation that writes into {what} (through the same tensor or its "
                                "memory: contiguous(), nn.Identity and no-op reshapes return their input); use the "
                                "out-of-place form")
        dependent = any(self.bound.get(a, 0.0) > 0 for a in _tensor_args(node))
        if dependent and len(operand.users) > 1:
            self.fail(node, "an in-place operation on a value that is also used elsewhere")
        if dependent and written._base is not None:
            self.fail(node, "an in-place operation on a view of another value (it also changes that value); use "
                            "the out-of-place form")
        # Any other value in the same memory that is read later would change under its bound: the
        # same tensor object (contiguous(), nn.Identity, a no-op flatten return their input) or a view.
        # A write of constants only matters to values that depend on the input.
        position = self.position[node]
        for other, value in self.env.items():
            if other is operand or not any(self.position[user] > position for user in other.users) or \
                    not (dependent or self.bound.get(other, 0.0) > 0):
                continue
            if any(_shares_memory(written, tensor) for tensor in _tensors(value)):
                self.fail(node, f"an in-place operation on a tensor that is also the value of %{other.name} (the "
                                "same tensor or its memory: contiguous(), nn.Identity and no-op reshapes return "
                                "their input), which is used later; use the out-of-place form")

    def _keep_factor(self, node: torch.fx.Node):
        """Copy a constant factor that an in-place product overwrites (``c.mul_(y)`` leaves ``c * y``
        in ``c``) before it runs: the bound takes the factor's values, not the product's."""
        first = node.args[0] if node.args else None
        if _key(node) in _SCALINGS and isinstance(first, torch.fx.Node) and self.bound.get(first, 0.0) == 0 and \
                torch.is_tensor(self.env[first]) and _writes_into_first_argument(node, self.module):
            self.overwritten_factors[node] = self.env[first].clone()

    def _check_reads(self, node: torch.fx.Node):
        """Refuse a node that reads an input-dependent value changed in place since it was bounded."""
        for a in _tensor_args(node):
            if self.bound.get(a, 0.0) > 0 and [_version(t) for t in _tensors(self.env[a])] != self.versions[a]:
                self.fail(node, f"reads %{a.name} after an in-place operation changed it through another name for "
                                "the same memory (its bound no longer holds); use out-of-place operations")

    def _check_state(self, node: torch.fx.Node, value):
        """Refuse a node that wrote into the input, a parameter, a buffer or an attribute, or that
        read an attribute replaced since the run began."""
        if node.op == "get_attr" and value is not self.attributes[node]:
            self.fail(node, f"reads attribute {node.target!r}, which the forward replaces while it runs; its value "
                            "cannot be taken as a constant")
        for tensor, version, what in self.protected:
            if _version(tensor) != version:
                self.fail(node, f"writes into {what}, whose values this bound takes as given; use out-of-place "
                                "operations")

    def _check_rearrangement(self, node: torch.fx.Node, source: torch.Tensor, *parts: torch.Tensor):
        """Refuse a rearrangement or split given more than sizes and dimensions, or changing the dtype."""
        given = _leaves(torch.fx.node.map_arg((node.args[1:], node.kwargs), lambda n: self.env[n]))
        for v in given:
            if not (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, torch.memory_format)):
                self.fail(node, f"a rearrangement given a {type(v).__name__} ({v!r}): only sizes and dimensions "
                                "are allowed (view(dtype) reinterprets the bits, which is not Lipschitz)")
        for p in parts:
            if p.dtype != source.dtype:
                self.fail(node, f"changes the dtype from {source.dtype} to {p.dtype} (view(dtype) reinterprets "
                                "the bits, which is not Lipschitz)")
        # The batch size may be given as it is, as the first size of a view or reshape; a number
        # computed from it (``(x.shape[0] - 1) % 3 + 1`` is the batch size at 2 and 3, the batches
        # traced, and 1 at 4, where the reshape puts four examples in one row) is refused.
        first = None
        if _key(node) in ("view", "reshape", torch.reshape):
            first = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
            if isinstance(first, (tuple, list)) and first:
                first = first[0]
        sizes: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args[1:], node.kwargs), lambda n: sizes.append(n) or n)
        for n in sizes:
            if n in self.batch_numbers and not (n is first and n in self.batch_sizes):
                self.fail(node, f"a size or dimension computed from the batch size (%{n.name}): the graph is checked "
                                "at batch sizes 1 to 3, and such a number may put several examples in one row at "
                                "others; give the batch size as x.shape[0], x.size(0) or -1, first, and other "
                                "sizes from the other dimensions")

    def _note_batch_number(self, node: torch.fx.Node, value):
        """Note a number or size that depends on the batch size (``batch_numbers``): the first
        dimension or the number of elements of a value whose shape depends on the input's, and what is
        computed from them; and among them the batch size read as it is (``batch_sizes``: ``x.shape``,
        ``x.shape[0]``, ``x.size(0)`` of a batched value)."""
        if torch.is_tensor(value):
            return
        dims, first = None, None
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape" or (
                node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs):
            dims, owner, first = range(len(value)), node.args[0], value[0] if len(value) else None
        elif node.op == "call_method" and node.target == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dim, int) and torch.is_tensor(self.env.get(node.args[0])):
                dims, owner, first = [dim % max(1, self.env[node.args[0]].dim())], node.args[0], value
        elif node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and isinstance(
                self.env.get(node.args[0]), torch.Size) and isinstance(node.args[1], (int, slice)):
            size = self.env[node.args[0]]
            dims = range(len(size))[node.args[1]]
            dims, owner = (dims if isinstance(dims, range) else [dims]), node.args[0]
            first = value if isinstance(value, int) else (value[0] if len(value) else None)
        if dims is not None:
            if 0 in dims and _reads_input_shape(owner):
                self.batch_numbers.add(node)
                # (a constant's first dimension may be any number computed from the batch size)
                if list(dims)[:1] == [0] and first == self.batch and (
                        owner in self.batch_sizes or self.bound.get(owner, 0.0) > 0):
                    self.batch_sizes.add(node)
            return
        if node.op == "call_method" and node.target == "numel" and _reads_input_shape(node) or \
                any(a in self.batch_numbers for a in _tensor_args(node)):
            self.batch_numbers.add(node)

    def _reads_shape_number(self, node: torch.fx.Node) -> bool:
        """Whether a constant (bound 0) is computed from a number read from the shape of a value
        that depends on the input: its batch size, say, which changes from batch to batch. Sizes
        passed whole as the size of a factory (``torch.full(x.shape, 2.0)``) give constants that do
        not change with it; ``torch.tensor(x.shape)`` does."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or self.bound.get(n, 0.0) > 0:
                continue
            seen.add(n)
            if n in self.shape_numbers:
                return True
            if n.op == "call_function" and n.target in _FACTORIES:
                stack.extend(_tensor_args(n)[1:] if n.args and isinstance(n.args[0], torch.fx.Node) else
                             [a for a in _tensor_args(n) if a is not n.kwargs.get("size")])
            else:
                stack.extend(_tensor_args(n))
        return False

    def _batched(self, node, *values):
        for v in values:
            if torch.is_tensor(v) and (v.dim() == 0 or v.shape[0] != self.batch):
                self.fail(node, f"a tensor of shape {tuple(v.shape)} does not keep the batch (of {self.batch}) as its "
                                "first dimension, so this operation may mix examples")

    def _node_bound(self, node: torch.fx.Node, value) -> float:
        args = _tensor_args(node)
        dependent = [a for a in args if self.bound.get(a, 0.0) > 0]
        if node.op == "placeholder":  # the input, or an extra argument of forward at its default (a constant)
            self.rule[node] = ("input",) if _is_input(node) else ("constant",)
            return 1.0 if _is_input(node) else 0.0
        target = node.target
        if node.op == "get_attr" or not dependent or (node.op == "call_method" and target in _SHAPE_METHODS) or (
                target is getattr and len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES):
            self.rule[node] = ("constant",)
            return 0.0  # constant, or a property of the input's shape (not of its values)
        for v in (value if isinstance(value, (tuple, list)) and node.op != "call_module" else (value,)):
            if torch.is_tensor(v) and not (v.is_floating_point() or v.is_complex()):
                self.fail(node, f"a {v.dtype} result that depends on the input (e.g. argmax indices): not a Lipschitz "
                                "function of it")
        if node.op == "call_module":
            child = self.module.get_submodule(target)
            first = node.args[0] if node.args else None
            if dependent != [first] or len(node.args) != 1 or node.kwargs:
                self.fail(node, "a child called with more than its input tensor")
            x = self.env[first]
            if not torch.is_tensor(x):
                self.fail(node, f"a child called with a {type(x).__name__}, not a tensor")
            self._batched(node, x, value)
            self.rule[node] = ("child", child, first)
            return mul_up(self.child_bound(child, tuple(x.shape[1:])), self.bound[first])
        if target in _SUMS | _SCALINGS and not torch.is_tensor(value):
            self.fail(node, f"a sum or product giving a {type(value).__name__} (tuple concatenation or repetition "
                            "copies its parts): no Lipschitz rule for it")
        if target in _SUMS:
            alpha = node.kwargs.get("alpha", 1)
            operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(node.args) != 2 or set(dependent) - set(operands) or set(node.kwargs) - {"alpha"} or \
                    isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                self.fail(node, "a sum with unsupported arguments")
            total, terms = 0.0, []
            for position, a in enumerate(node.args):
                if isinstance(a, torch.fx.Node) and self.bound[a] > 0:
                    if self.env[a].shape != value.shape:
                        self.fail(node, "a non-constant operand is broadcast (its entries are copied)")
                    scale = max([abs(float(alpha)), *(_magnitudes(applied)[0] for applied in _applied_factors(
                        alpha, value.dtype))]) if position == 1 else 1.0
                    total = add_up(total, mul_up(scale, self.bound[a]))
                    terms.append((a, scale))
            self.rule[node] = ("linear", terms)
            return total
        if target in _SCALINGS:
            if len(dependent) != 1 or len(node.args) != 2 or node.kwargs:
                self.fail(node, "a product or quotient of two values that depend on the input")
            u = dependent[0]
            other = node.args[1] if node.args[0] is u else node.args[0]
            if isinstance(other, torch.fx.Node) and self._reads_shape_number(other):
                self.fail(node, "a factor computed from the shape of a value that depends on the input (the batch "
                                "size, read by x.shape[0], x.size(0) or x.numel(), changes it from batch to batch, and "
                                "a constant of the input's shape acted on by more than elementwise operations, e.g. "
                                "torch.ones(x.shape).cumsum(0), may differ from example to example); use a constant")
            if isinstance(other, torch.fx.Node):
                constant = self.overwritten_factors.get(node, self.env[other])
            else:
                constant = other
            if torch.is_tensor(constant):
                if constant.numel() == 0:
                    self.fail(node, "an empty factor")
                big, small = _magnitudes(constant)
            elif isinstance(constant, (int, float)) and not isinstance(constant, bool):
                big = small = abs(float(constant))
            else:
                self.fail(node, f"a factor of type {type(constant).__name__}")
            for applied in _applied_factors(constant, value.dtype):
                b, s = _magnitudes(applied)
                big, small = max(big, b), min(small, s)
            if self.env[u].shape != value.shape:
                self.fail(node, "a non-constant operand is broadcast (its entries are copied)")
            if target in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
                if node.args[0] is not u or node.kwargs.get("rounding_mode") is not None:
                    self.fail(node, "division by a value that depends on the input")
                factor = math.inf if small == 0 else math.nextafter(1 / small, math.inf)
            else:
                factor = big
            if math.isinf(factor) or math.isnan(factor):
                self.fail(node, "an unbounded factor")
            self.rule[node] = ("linear", [(u, factor)])
            return mul_up(factor, self.bound[u])
        single = len(dependent) == 1 and node.args and node.args[0] is dependent[0]
        if target in _ONE_LIPSCHITZ and single:
            if target is F.dropout and not (node.kwargs.get("training") is False or
                                            (len(node.args) > 2 and node.args[2] is False)):
                self.fail(node, "dropout that may be active (training not False)")
            self.rule[node] = ("linear", [(dependent[0], 1.0)])
            return self.bound[dependent[0]]
        if target in _REARRANGEMENTS and single:
            self._check_rearrangement(node, self.env[dependent[0]], value)
            self._batched(node, self.env[dependent[0]], value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target in _SPLITS and single:
            position = 1 if target in (torch.unbind, "unbind") else 2  # of dim: unbind(x, dim), split(x, size, dim)
            dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
            if not isinstance(dim, int) or dim % self.env[dependent[0]].dim() == 0:
                self.fail(node, "a split along the batch dimension (at other batch sizes its parts hold other "
                                "examples, or some of them)")
            self._check_rearrangement(node, self.env[dependent[0]], *value)
            self._batched(node, self.env[dependent[0]], *value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target is operator.getitem and single:
            source = self.env[dependent[0]]
            index = node.args[1]
            if isinstance(source, (tuple, list)):
                if not isinstance(index, int):
                    self.fail(node, "an index into a sequence that is not an int")
                self.rule[node] = ("exact", dependent[0])
                return self.bound[dependent[0]]
            indices = index if isinstance(index, tuple) else (index,)
            if not indices or not all(i is Ellipsis or i is None or isinstance(i, slice) and all(
                    not isinstance(b, torch.fx.Node) for b in (i.start, i.stop, i.step)) or
                    isinstance(i, int) for i in indices) or indices[0] != slice(None):
                self.fail(node, "an index other than basic slicing that keeps the whole batch")
            self._batched(node, source, value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target in _CATS and len(node.args) >= 1 and isinstance(node.args[0], (list, tuple)):
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if set(dependent) - set(parts) or not isinstance(dim, int) or dim % value.dim() == 0:
                self.fail(node, "a concatenation along the batch dimension")
            self._batched(node, value, *(self.env[p] for p in parts if isinstance(p, torch.fx.Node)))
            total = 0.0
            for p in parts:
                if isinstance(p, torch.fx.Node) and self.bound[p] > 0:
                    total = add_up(total, mul_up(self.bound[p], self.bound[p]))
            self.rule[node] = ("cat", [p for p in parts if isinstance(p, torch.fx.Node) and self.bound[p] > 0])
            return sqrt_up(total) if total > 0 else 0.0
        self.fail(node, "no Lipschitz rule for this operation")


def _applied_factors(constant, dtype: torch.dtype) -> list[torch.Tensor]:
    """The factor as a product or quotient of ``dtype`` may apply it: cast to ``dtype`` (a 0-dim
    float32 tensor times a bfloat16 one: 1.005 becomes 1.0078125), and, for half precisions, to
    float32, in which torch computes them (``x * 0.1`` multiplies by float32's 0.1, 1.5e-8 more)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return []
    value = constant.detach() if torch.is_tensor(constant) else torch.tensor(float(constant), dtype=torch.float64)
    dtypes = {dtype} | ({torch.float32} if dtype in (torch.float16, torch.bfloat16) else set())
    return [value.to(d) for d in dtypes if d != value.dtype]


def _magnitudes(constant: torch.Tensor) -> tuple[float, float | int]:
    """``(max |c|, min |c|)`` of a constant factor, the first a float rounded upwards. Integers
    are read exactly (``abs`` of the most negative one overflows to itself: ``abs(-128) == -128``
    in int8, and int64 magnitudes above 2^53 round to floats), complex magnitudes in float64 with
    a margin of one rounding."""
    values = constant.detach()
    if values.is_complex():
        magnitudes = values.to(torch.complex128).abs()
        return math.nextafter(float(magnitudes.max()), math.inf), math.nextafter(float(magnitudes.min()), 0.0)
    if values.is_floating_point() or values.dtype == torch.bool:
        magnitudes = values.double().abs()  # exact for every floating dtype
        return float(magnitudes.max()), float(magnitudes.min())
    big = max(abs(int(values.max())), abs(int(values.min())))
    positive, negative = values[values >= 0], values[values < 0]
    small = min(([int(positive.min())] if positive.numel() else []) +
                ([-int(negative.max())] if negative.numel() else []))
    rounded = float(big)
    return (rounded if rounded >= big else math.nextafter(rounded, math.inf)), small


def _traced_rounding(module: nn.Module, h: torch.Tensor, err: torch.Tensor, bounds: dict, propagate):
    """``(module(h), e)``: the float64 output of a module bounded by :func:`traced_lipschitz_bound`
    and a per-example bound ``e`` on its L2 distance to the exact output, node by node.

    A traced forward need not be one sum of products (``(x + c) - c`` with a large constant
    ``c`` loses the digits of ``x``), so the rounding allowance of
    :mod:`lipnet.certify.precision` for a module as a whole does not hold for it. The graph must
    compute exactly what the forward computes on ``h``, assigning no attribute (see
    :class:`_AttributeWrites`): a Python value it froze (a flag a child sets for large inputs
    only) would make the logits certified differ from the model's. Each node then adds its own
    rounding: children through ``propagate`` (the certification pass itself), and an
    elementwise node with Lipschitz factors ``f_i`` on operands ``a_i`` and value ``y`` adds at most
    ``4 u (sum f_i ||a_i|| + ||y||)`` to ``sum f_i e(a_i)``, and the underflow of its products
    (:func:`~lipnet.certify.precision.underflow_bound` of its ``numel(y)`` outputs and operands:
    ``x / 64`` rounds ``2^-1070`` to 0, which a later layer may scale by ``2^1023``);
    rearrangements and concatenations are exact (the latter combines its parts' errors in L2)."""
    traced = _trace(module)
    writes = _AttributeWrites(module)

    def child_bound(child, shape):
        found = bounds.get((id(child), shape))
        if found is not None:
            return found
        with writes.paused():
            return lipschitz_bound(child, shape)

    run = _BoundInterpreter(traced, module, len(h), child_bound, keep_values=True)
    with torch.no_grad(), writes.watching():
        y = run.run(h)
        expected = module(h.clone())
    if not (torch.is_tensor(expected) and torch.equal(y, expected)):
        raise LipschitzBoundError(module, "its forward computes other values than its torch.fx graph on the inputs "
                                          "being certified (a Python value the graph froze, such as an attribute set "
                                          "for some inputs only); the bound and the logits describe the graph, not "
                                          "the forward")
    errors: dict = {}
    for node in traced.graph.nodes:
        if node.op == "output":
            return y, errors[node.args[0]]
        kind, *parts = run.rule[node]
        if kind == "input":
            errors[node] = err
        elif kind == "constant":
            errors[node] = torch.zeros_like(err)
        elif kind == "child":
            child, first = parts
            errors[node] = propagate(child, run.env[first], errors[first], bounds)[1]
        elif kind == "linear":
            (terms,) = parts
            total = sum(factor * errors[a] for a, factor in terms)
            size = sum(factor * example_norms(run.env[a]) for a, factor in terms) + example_norms(run.env[node])
            errors[node] = total + 4 * UNIT_ROUNDOFF * size + underflow_bound(run.env[node][0].numel() + len(terms))
        elif kind == "exact":
            errors[node] = errors[parts[0]]
        else:  # "cat"
            errors[node] = torch.stack([errors[p] for p in parts]).square().sum(0).sqrt() * (1 + 4 * UNIT_ROUNDOFF)
    raise LipschitzBoundError(module, "its graph has no output")


traced_lipschitz_bound.propagate_rounding = _traced_rounding


#: Types :func:`convert` registered :func:`traced_lipschitz_bound` for (in this process).
_TRACED_TYPES: set[type] = set()


def _register_traced_bounds(model: nn.Module, shapes, report: ConversionReport) -> None:
    """Register :func:`traced_lipschitz_bound` for the container types lipnet.certify does not know.

    A type is registered when lipnet.certify raises :class:`~lipnet.certify.UnknownModuleError`
    for the module itself (not for a descendant) and its forward can be traced. The bound
    is computed from each instance's own graph, so it is sound for every instance.
    """
    seen: set[type] = set()
    parametrizations = _parametrizations(model)
    for path, module in model.named_modules():
        if type(module) in seen | _TRACED_TYPES or not _is_custom_container(module) or isinstance(
                module, _ATTENTION) or _inside(path, parametrizations):
            continue
        calls = shapes.get(id(module))
        if not calls:
            continue
        seen.add(type(module))
        try:
            lipschitz_bound(module, calls[0][1:])
        except UnknownModuleError as error:
            if error.module is not module:
                continue
            try:
                _trace(module)
            except Exception:
                continue  # reported as an obstacle
            register_lipschitz_bound(type(module), traced_lipschitz_bound)
            _TRACED_TYPES.add(type(module))
            report.registered.append(_qualname(module))
        except LipschitzBoundError:
            continue
