"""The bounds run outside autocast, on every device."""

from __future__ import annotations

import contextlib

import torch


def autocast_disabled(device_type: str):
    """``torch.autocast(device_type, enabled=False)``: inside it a bound computes in its own
    dtype even within an autocast region of the caller. A device without autocast (``meta``,
    where layers infer shapes or wait for deferred initialization) has no region to leave, and
    ``torch.autocast`` refuses it: there this is a context that does nothing."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
