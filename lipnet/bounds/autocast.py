"""The arithmetic the bounds run in: outside autocast, with full float32 matrix products."""

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


def _matmul_backends() -> list:
    """The backends whose float32 matrix products a precision setting may lower (cuBLAS: TF32;
    oneDNN on CPUs with bfloat16 units), through their ``fp32_precision`` (torch >= 2.9)."""
    backends = [torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    return [backend for backend in backends if backend is not None and hasattr(backend, "fp32_precision")]


@contextlib.contextmanager
def ieee_float32_matmuls():
    """Float32 matrix products in full float32 inside (no TF32 or bfloat16 passes), whatever the
    caller set with ``torch.set_float32_matmul_precision``, ``torch.backends.cuda.matmul.allow_tf32``
    or the backends' ``fp32_precision``; restored on exit.

    A Gram bound computed with TF32 products (about 11 bits) can fall below the norm it bounds
    (by about 2e-4 relative for a 64 x 128 matrix with bfloat16 passes on a CPU). The settings
    are set per backend through the ``fp32_precision`` attributes, which neither read nor
    disturb the legacy ones (reading those raises once both kinds were used). Eager only: under
    ``torch.compile`` a traced function cannot switch global settings, so the compiled products
    follow the caller's (the default, ``"highest"``, is full float32).
    """
    if torch.compiler.is_compiling():
        yield
        return
    backends = _matmul_backends()
    if not backends:  # torch < 2.9: the legacy setting alone
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [backend.fp32_precision for backend in backends]
    if all(value == "ieee" for value in saved):
        yield
        return
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value
