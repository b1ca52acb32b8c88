"""Bounding Gram layers of one configuration together: one stacked computation per training step.

A network often repeats one layer shape (a residual trunk of equal convolutions, two
convolutions per stage). The Gram bounds of such layers are independent but identical in
structure, so their weights can be stacked and bounded by one batched computation
(:func:`lipnet.bounds.conv2d_spectral_norm` on a ``(L, ...)`` stack): the same few
operations for ``L`` layers as for one. On a GPU, where the bound's cost is its number of
kernel launches rather than its arithmetic, that removes most of the per-layer cost, and a
compiled graph gets smaller.

Each layer still applies its own weight divided by its own bound, computed on the input
size it actually sees (a layer seeing another size than the one assumed is bounded again,
on its own), so every layer stays 1-Lipschitz exactly as when it runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipnet.bounds.autocast import autocast_disabled
from lipnet.nn.normalized import (
    GramNormalized,
    can_check_values,
    finite_quotient_divisor,
    refuse_weight_gradient,
    unusable_bounds,
)


def stacked_normalized_weights(layers: Sequence[GramNormalized], input_size,
                               weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The normalized weights of ``layers``, all of one :meth:`~GramNormalized.stack_key`, bounded together.

    Args:
        layers: Gram layers whose ``stack_key()`` are equal and not ``None``.
        input_size: the spatial size of the input each of them is applied to.
        weights: one read of each layer's ``weight`` already made, or ``None`` to read them. A
            parametrization computes the weight anew at each read (and ``spectral_norm``'s
            advances its power iteration), so a caller that has read them passes them here.

    Returns:
        One tensor per layer: its ``_operator_weight() / max(bound, TINY)``, the weight its
        ``normalized_weight(input_size)`` would give (up to rounding), differentiable.

    Example:
        >>> from lipnet.nn import GramConv2d
        >>> convs = [GramConv2d(8, 8, 3, padding=1) for _ in range(3)]
        >>> weights = stacked_normalized_weights(convs, (16, 16))
        >>> [tuple(w.shape) for w in weights]
        [(8, 8, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3)]
    """
    layers = list(layers)
    if not layers:
        return []
    read = [layer.weight for layer in layers] if weights is None else list(weights)
    if len(read) != len(layers):
        raise ValueError(f"stacked_normalized_weights: {len(read)} weights for {len(layers)} layers")
    keys = [layer.stack_key(weight) for layer, weight in zip(layers, read)]
    if keys[0] is None or any(key != keys[0] for key in keys[1:]):
        raise ValueError("stacked_normalized_weights: the layers must share one stack_key (same class, "
                         "weight shape, dtype, device, geometry and n_iter) for this input size")
    own = [layer._operator_weight(weight) for layer, weight in zip(layers, read)]
    for layer, weight in zip(layers, own):
        layer._check_weight_shape(weight)
    # Outside the caller's autocast: it would cast the weights to its dtype (torch.stack is one of its
    # promoting ops), and a float16 region refuses bfloat16 weights outright.
    with autocast_disabled(own[0].device.type):
        weights = torch.stack(own)
    bounds = layers[0]._operator_norm(weights, input_size, layers[0].n_iter)
    checked = [i for i, layer in enumerate(layers) if layer.check_finite]
    zero = []
    if checked and can_check_values(bounds):
        unusable = unusable_bounds(bounds[checked], [own[i].requires_grad for i in checked])
        if bool(unusable.any()):  # one host synchronization for the whole stack
            for i in (checked[int(j)] for j in unusable.nonzero()[:, 0]):
                if not bool(torch.isfinite(bounds[i])):
                    layers[i]._raise_not_finite(bounds[i])
                zero.append(i)
    if weights.dtype.itemsize >= 4:
        scale = finite_quotient_divisor(bounds, weights, weights.dtype)  # as for a layer alone
        normalized = list((weights / scale.view(-1, *([1] * (weights.dim() - 1)))).unbind(0))
    else:  # each rounded quotient checked and kept finite, as a layer alone does (GramNormalized._divide)
        normalized = [layer._divide(weight, bound, input_size) for layer, weight, bound in zip(layers, own, bounds)]
    for i in zero:  # each layer's own weight gradient, not the stack's
        normalized[i] = refuse_weight_gradient(normalized[i], layers[i])
    return normalized


class GramSequential(nn.Sequential):
    """``nn.Sequential`` that, in training mode, bounds its Gram layers of one configuration together.

    Same construction, ``state_dict`` and eval-mode behaviour as ``nn.Sequential``. In
    training mode, when the first of several direct children with one
    :meth:`~lipnet.nn.normalized.GramNormalized.stack_key` (e.g. the equal residual
    convolutions of a LiResNet) is reached, the normalized weights of it and the later ones
    are computed in one stacked bound computation (:func:`stacked_normalized_weights`) for
    the input size it sees; a later layer that sees another size is bounded again on its own
    input. The output equals the plain ``nn.Sequential``'s up to rounding, and each layer
    is 1-Lipschitz as when it runs alone. Stacking calls a child's
    ``_forward_normalized`` instead of the child itself, so it is used only for children that
    run their class's ``forward`` as written (:func:`stackable_call`): children with hooks of
    any kind (forward or backward, their own or global), a ``forward`` of their own (an
    overriding subclass, or one assigned to the instance) or an overridden ``__call__`` run
    as plain modules.

    Stacking pays where each operation costs a kernel launch (GPUs: one set of launches for
    ``L`` layers); on a CPU the arithmetic dominates and the larger stacked tensors were
    measured slower (``docs/benchmarks.md``), so by default it is used only for inputs on
    an accelerator.

    Args:
        *args: the modules, as ``nn.Sequential`` (or one ``OrderedDict``).
        stack_bounds: ``None`` (default): stack for inputs not on the CPU; ``True``: always;
            ``False``: never (every layer bounds itself).

    Example:
        >>> from lipnet.nn import GramConv2d, MaxMin
        >>> net = GramSequential(GramConv2d(4, 4, 3, padding=1), MaxMin(), GramConv2d(4, 4, 3, padding=1))
        >>> net(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, *args, stack_bounds: bool | None = None):
        super().__init__(*args)
        if stack_bounds not in (None, True, False):
            raise ValueError(f"stack_bounds must be None, True or False, got {stack_bounds!r}")
        self.stack_bounds = stack_bounds

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        stack = input.device.type != "cpu" if self.stack_bounds is None else self.stack_bounds
        stackable = self._stackable() if self.training and stack else {}
        if not stackable:
            return super().forward(input)
        x = input
        ready: dict[int, tuple] = {}  # child index -> (input size assumed, normalized weight)
        for index, module in enumerate(self):
            if index not in stackable:
                x = module(x)
                continue
            key, weight = stackable[index]
            # The spatial size, (h, w) or (n,) in 1-D, by the padding torch fixes per axis at construction:
            # kernel_size may have been set to something else since (the weight-shape check names it).
            spatial_dims = len(module._reversed_padding_repeated_twice) // 2
            size = tuple(int(n) for n in x.shape[-spatial_dims:])
            entry = ready.pop(index, None)
            if entry is None or entry[0] != size:
                members = [j for j, other in stackable.items() if j >= index and other[0] == key]
                if len(members) == 1:  # bounded alone, on the weight already read (what forward computes)
                    module._check_input(x)
                    normalized = module._normalize(module._operator_weight(weight), module._input_size(size))
                    x = module._forward_normalized(x, normalized)
                    continue
                weights = stacked_normalized_weights([self[j] for j in members], size,
                                                     [stackable[j][1] for j in members])
                ready.update((j, (size, normalized)) for j, normalized in zip(members, weights))
                entry = ready.pop(index)
            x = module._forward_normalized(x, entry[1])
        return x

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        if isinstance(idx, slice):  # a slice keeps the setting (a child is returned as it is)
            item.stack_bounds = self.stack_bounds
        return item

    def extra_repr(self) -> str:
        return "" if self.stack_bounds is None else f"stack_bounds={self.stack_bounds}"

    def _stackable(self) -> dict[int, tuple]:
        """``{index: (stack key, weight)}`` of the children that may be bounded with others: Gram
        layers with a stack key whose call :func:`stackable_call` allows, each with the one read of
        its ``weight`` that this forward uses (a parametrization computes it anew at each read)."""
        if _global_hooks():
            return {}
        found = {}
        for index, module in enumerate(self):
            if stackable_call(module) and type(module).stack_key is not GramNormalized.stack_key:
                weight = module.weight
                if (key := module.stack_key(weight)) is not None:
                    found[index] = (key, weight)
        return found if len(found) > 1 else {}


#: What ``nn.Module.__call__`` runs: overriding one of these changes what ``module(x)`` computes.
_CALL_METHODS = ("__call__", "_wrapped_call_impl", "_call_impl")


def call_override(module: nn.Module) -> str | None:
    """What makes ``module(x)`` compute something other than ``type(module).forward(module, x)``
    (hooks aside), or ``None``.

    That is a ``forward`` (or ``_call_impl``) assigned to the instance, as wrappers that patch
    ``module.forward`` do, which ``nn.Module.__call__`` runs instead of the class's, or a
    class that overrides ``__call__`` (or the ``nn.Module`` methods it calls).
    """
    for name in ("forward", *_CALL_METHODS[1:]):
        if name in vars(module):
            return f"has its own {name} (assigned to the instance: module.{name} = ...)"
    for name in _CALL_METHODS:
        if getattr(type(module), name) is not getattr(nn.Module, name):
            return f"overrides nn.Module.{name} (in class {type(module).__name__})"
    return None


def stackable_call(module: nn.Module) -> bool:
    """Whether :class:`GramSequential` may replace ``module(x)`` by ``module._forward_normalized``
    with a stacked weight: ``module`` is a Gram layer whose ``forward`` and ``normalized_weight``
    are those of the class defining ``_forward_normalized`` (so ``forward`` is
    ``_forward_normalized(x, normalized_weight(size))``), not overridden on the instance or by
    :func:`call_override`, and it has no hooks of its own (forward, forward pre-, backward
    or backward pre-hooks), which the direct call would skip. Global hooks are checked
    by the caller, once."""
    if not isinstance(module, GramNormalized):
        return False
    cls = type(module)
    owner = next((c for c in cls.__mro__ if "_forward_normalized" in vars(c)), None)
    if owner is None or "forward" not in vars(owner) or call_override(module) is not None:
        return False
    if any(getattr(cls, name) is not getattr(owner, name) or name in vars(module)
           for name in ("forward", "_forward_normalized", "normalized_weight")):
        return False
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether any global module hook (``nn.modules.module.register_module_*_hook``) is registered."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)
