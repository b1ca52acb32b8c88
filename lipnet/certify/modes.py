"""Context managers that put a model in the state certification needs and restore it exactly."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode for every submodule, then each module's own ``training`` flag restored.

    Unlike ``model.train(previous)``, a model with some submodules in eval mode and others
    in train mode gets back exactly that mix. A module that stays in training mode after
    ``model.eval()`` (a ``train`` override, as Monte-Carlo dropout has) is refused with a
    ``ValueError``: its output is not the eval-mode function that certificates describe.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for name, module in model.named_modules():
            if module.training:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) stays in training mode after model.eval() (its train() "
                    "keeps it there), so it does not compute the eval-mode function that Lipschitz bounds and "
                    "certificates describe (dropout in training mode is random and scales by 1/(1-p)); certify a model "
                    "whose modules all follow eval()")
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen(model: nn.Module):
    """``requires_grad=False`` on every parameter, then each parameter's flag restored.

    Gram layers in eval mode cache their normalized weights only when no weight gradient
    is wanted, so an attack on a frozen model computes no spectral bound per step.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
