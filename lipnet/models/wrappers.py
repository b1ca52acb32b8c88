"""torch's wrapper modules and the module inside them.

``torch.compile`` (``OptimizedModule``), ``nn.DataParallel``,
``nn.parallel.DistributedDataParallel`` and ``torch.optim.swa_utils.AveragedModel`` (EMA,
SWA) hold one module and, with their own forwards, compute what it computes. A subclass
that overrides ``forward``, or a user's module that happens to name a child ``_orig_mod``
or ``module``, may compute something else and hold weights of its own: it is not a
wrapper here, so saving it keeps all of it and certifying it bounds all of it.
"""

from __future__ import annotations

from torch import nn


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module inside ``module`` if ``module`` is one of torch's wrappers running its class's
    own forward, else ``None``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> wrapped_module(nn.DataParallel(net)) is net
        True
        >>> wrapped_module(net) is None
        True
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if type(module) is OptimizedModule:  # its forward is an instance attribute: the compiled call
        return module._orig_mod
    for cls, methods in _FORWARD_PATHS.items():
        if isinstance(module, cls) and not _overrides(module, cls, methods):
            return module.module
    return None


def _forward_paths() -> dict:
    from torch.optim.swa_utils import AveragedModel

    ddp = ("forward", "_pre_forward", "_run_ddp_forward", "_inside_ddp_forward", "_post_forward", "_to_kwargs",
           "to_kwargs")
    return {nn.DataParallel: ("forward", "scatter", "replicate", "parallel_apply", "gather"),
            nn.parallel.DistributedDataParallel: ddp, AveragedModel: ("forward",)}


#: The methods each wrapper's forward runs, on the module's inputs or outputs: a subclass, or the
#: instance itself, that replaces one of them may compute something else than the module inside
#: (an EMA's own ``update_parameters``, a ``__getattr__`` that forwards attributes, change no output).
_FORWARD_PATHS = _forward_paths()


def _overrides(module: nn.Module, cls: type, methods) -> bool:
    """Whether ``module`` (its instance attributes) or a class between its type and ``cls``
    defines one of ``methods``."""
    if any(name in vars(module) for name in methods):
        return True
    for klass in type(module).__mro__:
        if klass is cls:
            return False
        if any(name in vars(klass) for name in methods):
            return True
    return False


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, ..., the module inside]``: the wrappers of :func:`wrapped_module`, outermost first,
    then the first module that is not one."""
    chain = [model]
    while (inner := wrapped_module(chain[-1])) is not None:
        chain.append(inner)
    return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, ``DataParallel``, ``DistributedDataParallel`` and
    ``torch.optim.swa_utils.AveragedModel`` (EMA, SWA) wrappers, however nested; ``model`` itself
    if it is none of them (a subclass with its own forward is not unwrapped).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(nn.DataParallel(net))) is net
        True
    """
    return wrapper_chain(model)[-1]
