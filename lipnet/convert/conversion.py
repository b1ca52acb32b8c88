""":func:`convert`: swap layers for lipnet layers, register traced bounds, diagnose, certify."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lipnet.bounds.gram import DEFAULT_N_ITER
from lipnet.bounds.rounding import cpu_default_device
from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound, register_lipschitz_bound
from lipnet.certify.lipschitz import check_input_shape, module_output_lipschitz_bound
from lipnet.convert.diagnosis import _ATTENTION, _diagnose, _is_custom_container
from lipnet.convert.graph import _trace
from lipnet.convert.replacement import _input_shapes, _inside, _parametrizations, _plan, _qualname
from lipnet.convert.report import Conversion, ConversionReport
from lipnet.convert.traced_bound import traced_lipschitz_bound

#: Values of ``convert(..., activation=...)``.
ACTIVATIONS = ("maxmin", None)


def _outside_inference_mode(function):
    """``function`` run outside a caller's ``torch.inference_mode()`` and with tensors made without a
    device on the CPU: in inference mode the copy, and the new layers, would get inference tensors as
    parameters (not trainable afterwards; the Gram layers' weight cache, which reads version
    counters, failed on them with a misleading "does not accept inputs of shape ...")."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), cpu_default_device():
            return function(*args, **kwargs)
    return wrapper


@_outside_inference_mode
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
            module_output_lipschitz_bound(module, calls[0][1:])
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
