"""Watching a forward for the attributes it assigns, which a traced graph cannot follow."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from torch import nn

from lipnet.certify import LipschitzBoundError
from lipnet.nn.normalized import GramNormalizedConv

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
