"""A process-wide on/off setting of the bounds: a setter that returns the previous value, and
a context manager that restores it (the pattern of ``torch.set_grad_enabled``)."""

from __future__ import annotations

import contextlib


class Switch:
    """One on/off setting; ``enabled`` is read where the setting applies."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def set(self, enabled: bool) -> bool:
        """Turn the setting on or off; returns the previous value."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        previous, self.enabled = self.enabled, enabled
        return previous

    @contextlib.contextmanager
    def scoped(self, enabled: bool):
        """The setting at ``enabled`` inside the ``with`` block, restored after it."""
        previous = self.set(enabled)
        try:
            yield
        finally:
            self.set(previous)
