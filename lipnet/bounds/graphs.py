"""Replaying the bound computations as CUDA graphs: a few launches instead of ~180.

In eager mode on a GPU a Gram bound costs the host time of launching its kernels, not
their arithmetic: about 180 operations forward and backward for a stacked convolution
bound, some 25-29 us of host time each (``docs/benchmarks.md``). A CUDA graph records those
launches once per configuration and replays them with one call.

With :func:`cuda_graphs` enabled, every bound computed on CUDA tensors outside
``torch.compile`` and outside a graph capture of the caller's is replayed from a graph
recorded at its first call with those shapes: its inputs are copied into the graph's own
tensors, the graph runs on the current stream, and its outputs are cloned out. Each call is
therefore independent of the next (several forward passes before a backward pass are fine).
A replayed bound costs no host time per operation, so it takes the path with the least
arithmetic, as on the CPU (:func:`launches_are_free`); its result equals the eager one's up
to float32 rounding. A graph keeps the memory of its intermediate tensors for as long as it
lives (one pool per device, shared by all graphs of lipnet), until
:func:`release_cuda_graphs`.

Only the bounds are replayed; the network around them runs as usual. To compile a whole
training step instead (the recipes do), leave this off: the compiled step replays the
bounds inside its own graphs.

Reference:
    PyTorch, "CUDA Graphs" (torch.cuda.CUDAGraph, torch.cuda.graph), and its notes on
    sharing a memory pool between graphs replayed in one stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from lipnet.bounds.switch import Switch

_REPLAY = Switch(False)
#: Recorded graphs by key (function, shapes, dtypes, device, settings).
_GRAPHS: dict[Hashable, _RecordedGraph] = {}
#: One memory pool per device, shared by the graphs (replayed one at a time on one stream).
_POOLS: dict[torch.device, tuple] = {}
#: More graphs than this means shapes keep changing: they are dropped and recorded anew.
MAX_GRAPHS = 64


def set_cuda_graphs(enabled: bool) -> bool:
    """Replay bounds computed on CUDA tensors as CUDA graphs (module docstring); returns the
    previous setting. Recorded graphs are kept (for the next time it is on) until
    :func:`release_cuda_graphs`."""
    return _REPLAY.set(enabled)


def cuda_graphs(enabled: bool = True):
    """Context manager form of :func:`set_cuda_graphs`.

    Example:
        >>> import lipnet
        >>> with lipnet.bounds.cuda_graphs():
        ...     pass  # training steps of a model on a GPU: its bounds are replayed
    """
    return _REPLAY.scoped(enabled)


def release_cuda_graphs() -> int:
    """Drop the recorded graphs, and with them the memory they hold; returns how many."""
    count = len(_GRAPHS)
    _drop_graphs()
    return count


def _drop_graphs() -> None:
    """Forget every graph and the pools they shared. A pool's handle is never reused once its
    graphs are gone: the caching allocator frees a private pool only when both its graphs and
    its blocks are gone, and a capture into a pool that lost its graphs but still holds blocks
    fails an internal assertion (seen on an H200, torch 2.11: ``use_count > 0``)."""
    _GRAPHS.clear()
    _POOLS.clear()


def replays(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a bound on ``tensors`` is replayed from a graph now: the setting is on, the
    tensors are on one CUDA device, and neither ``torch.compile`` nor a graph capture of
    the caller is in progress (there the bound's kernels become part of the caller's graph)."""
    if not _REPLAY.enabled or torch.compiler.is_compiling():
        return False
    device = tensors[0].device
    if device.type != "cuda" or any(t.device != device for t in tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


def launches_are_free(device: torch.device) -> bool:
    """Whether the operations of a bound on ``device`` cost no host time each now: under
    ``torch.compile`` (fused and launched from generated code) or on CUDA with
    :func:`cuda_graphs` on (the bound is replayed, or captured into the caller's graph). There,
    as on the CPU, its arithmetic sets its time; an eager bound on a GPU is set by its launches.

    A caller's own graph capture does not count by itself: the capture must take the path of
    the warm-up calls before it, which built and cached the constants that path needs (a
    constant cannot be copied to the GPU during a capture)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and _REPLAY.enabled


def replayed(function: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
             key: Callable[[], Hashable]) -> tuple[torch.Tensor, ...]:
    """``function(*inputs)``, replayed from the graph recorded for ``key()`` when :func:`replays`.

    ``function`` must be a pure function of its tensor inputs (anything else it uses is
    fixed by ``key()``, e.g. the kernel's size, or the address of a constant tensor that the
    closure keeps alive), return a tuple of tensors, and never synchronize with the host.
    ``key`` is only called when replaying (``torch.compile`` need not trace it); the shapes,
    dtypes and device of ``inputs`` are added to it here. Inputs and outputs may include
    ``None`` (passed through). Outputs are fresh tensors (clones of the graph's), inputs are
    only read.
    """
    if not replays([t for t in inputs if t is not None]):
        return function(*inputs)
    full_key = (key(), tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs))
    graph = _GRAPHS.get(full_key)
    if graph is None:
        if len(_GRAPHS) >= MAX_GRAPHS:
            _drop_graphs()
        graph = _GRAPHS[full_key] = _RecordedGraph(function, inputs)
    return graph(inputs)


class _RecordedGraph:
    """One function recorded as a CUDA graph on tensors of its own."""

    def __init__(self, function, inputs: Sequence[torch.Tensor | None]):
        device = next(x for x in inputs if x is not None).device
        self.function = function  # keeps the tensors its closure reads (and the graph reads) alive
        with torch.cuda.device(device), torch.no_grad():
            self.inputs = [None if x is None else x.detach().clone() for x in inputs]
            # Warm up on a side stream first (lazy initialization such as cuBLAS workspaces
            # must not happen during capture), as torch.cuda.graph's documentation asks.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                function(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            if device not in _POOLS:
                _POOLS[device] = torch.cuda.graph_pool_handle()
            # thread_local: a backward pass records on autograd's device thread while other
            # threads (e.g. a data loader's) may use CUDA.
            with torch.cuda.graph(self.graph, pool=_POOLS[device], capture_error_mode="thread_local"):
                self.outputs = tuple(function(*self.inputs))

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            for static, x in zip(self.inputs, inputs):
                if static is not None:
                    static.copy_(x)
            self.graph.replay()
            return tuple(None if out is None else out.clone() for out in self.outputs)
