"""Ctrl-C and SIGTERM held back while a run writes its checkpoint."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

#: The signals that stop a run: Ctrl-C, and a scheduler's preemption (``kill``).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred():
    """Run the block to its end even if Ctrl-C or SIGTERM arrives, then act on the first of them.

    A ``KeyboardInterrupt`` raised inside ``torch.save`` left its zip writer half-written, whose
    cleanup then raised a ``RuntimeError`` ("unexpected pos") in its place: the run ended with a
    traceback instead of its stop message. Held back, the signal takes effect once the
    checkpoint is whole: the handler that was installed before the block runs then (Python's
    default for Ctrl-C raises ``KeyboardInterrupt``). Signal handlers can only be set in the
    main thread; elsewhere, and for a signal whose handler was not set from Python, the block
    runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []

    def hold(signum, frame):
        pending.append((signum, frame))

    previous = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signum, frame = pending[0]
            handler = previous[signum]
            if handler is signal.SIG_DFL:
                signal.raise_signal(signum)
            else:
                handler(signum, frame)
