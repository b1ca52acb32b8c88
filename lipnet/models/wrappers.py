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
    from torch.optim.swa_utils import AveragedModel

    if type(module) is OptimizedModule:  # its forward is an instance attribute: the compiled call
        return module._orig_mod
    # The methods each wrapper's forward calls (None: any method of DDP's, whose forward runs many).
    forward_path = {nn.DataParallel: ("forward", "scatter", "replicate", "parallel_apply", "gather"),
                    nn.parallel.DistributedDataParallel: None, AveragedModel: ("forward",)}
    for cls, methods in forward_path.items():
        if isinstance(module, cls) and not _overrides(type(module), cls, methods):
            return module.module
    return None


def _overrides(subclass: type, cls: type, methods) -> bool:
    """Whether a class between ``subclass`` and ``cls`` defines one of ``methods`` (``None``: any
    method but ``__init__``); an EMA's own ``update_parameters``, for one, changes no output."""
    for klass in subclass.__mro__:
        if klass is cls:
            return False
        defined = {name for name, value in vars(klass).items() if callable(value) and name != "__init__"}
        if methods is not None:
            defined &= set(methods)
        if defined:
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
