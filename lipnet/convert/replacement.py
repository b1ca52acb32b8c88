"""Which modules :func:`~lipnet.convert.convert` swaps for lipnet layers, and their replacements."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.convert.report import Change
from lipnet.export.exporter import example_input
from lipnet.nn.activations import MaxMin
from lipnet.nn.gram_conv import GramConv2d
from lipnet.nn.gram_conv1d import GramConv1d
from lipnet.nn.gram_conv_transpose import GramConvTranspose2d
from lipnet.nn.gram_linear import GramLinear
from lipnet.nn.sequential import GramSequential

#: The layer types :func:`~lipnet.convert.convert` swaps for Gram layers (exact types), and the Gram layers.
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_GRAM_LAYERS = (GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear)


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
        layer = GramConv1d if isinstance(module, nn.Conv1d) else GramConv2d
        new = layer(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode, n_iter=n_iter,
                    **factory)
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
