"""lipnet.bounds.graphs: the setting, and that off CUDA nothing is recorded or changed.

The replay itself needs a GPU: tests/test_cuda.py compares replayed bounds with eager ones.
"""

import pytest
import torch

import lipnet
from lipnet.bounds import conv2d_spectral_norm, graphs
from lipnet.nn import GramLinear


def test_setting_and_context_manager():
    assert lipnet.bounds.set_cuda_graphs(True) is False
    try:
        with lipnet.bounds.cuda_graphs(False):
            assert not graphs._REPLAY.enabled
        assert graphs._REPLAY.enabled
    finally:
        assert lipnet.bounds.set_cuda_graphs(False) is True
    with pytest.raises(TypeError, match="True or False"):
        lipnet.bounds.set_cuda_graphs(1)


def test_cpu_bounds_are_computed_as_before_and_record_nothing():
    torch.manual_seed(0)
    stack = torch.randn(2, 4, 4, 3, 3)
    fc = GramLinear(12, 6)

    def bound_and_grads():
        weight = stack.clone().requires_grad_()
        bound = conv2d_spectral_norm(weight, 8, padding=1)
        bound.sum().backward()
        w = fc.normalized_weight()
        (g,) = torch.autograd.grad(w.sum(), fc.weight)
        return bound.detach(), weight.grad, w.detach(), g

    expected = bound_and_grads()
    lipnet.bounds.release_cuda_graphs()
    with lipnet.bounds.cuda_graphs():
        assert not graphs.replays([stack])
        got = bound_and_grads()
    assert not graphs._GRAPHS
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_replayed_runs_the_function_itself_when_not_replaying():
    calls = []

    def function(x):
        calls.append(1)
        return (x + 1,)
    with lipnet.bounds.cuda_graphs():
        (out,) = graphs.replayed(function, (torch.zeros(3),), lambda: "test")
    assert calls == [1] and torch.equal(out, torch.ones(3))
    assert lipnet.bounds.release_cuda_graphs() == 0


def test_launches_are_free_when_compiled_or_replayed():
    """Compiled: always. Eager: only for CUDA with the setting on (never the CPU or another
    device, whatever the setting)."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with lipnet.bounds.cuda_graphs():
        assert not graphs.launches_are_free(cpu) and not graphs.launches_are_free(meta)
    assert not graphs.launches_are_free(cpu)

    def marked(x):
        return x + 1 if graphs.launches_are_free(x.device) else x

    assert marked(torch.zeros(1)).item() == 0
    assert torch.compile(marked, fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1


def test_releasing_the_graphs_forgets_their_memory_pools(monkeypatch):
    """A pool handle is never reused after its graphs are dropped (a capture into such a pool
    fails an assertion of the caching allocator once a block outlives its graphs): release and
    the overflow past MAX_GRAPHS both forget the pools."""
    monkeypatch.setitem(graphs._POOLS, torch.device("cuda", 0), (0, 1))
    monkeypatch.setitem(graphs._GRAPHS, "recorded", object())
    assert lipnet.bounds.release_cuda_graphs() == 1
    assert not graphs._POOLS and not graphs._GRAPHS

    class Recorded:
        def __init__(self, function, inputs):
            self.function = function

        def __call__(self, inputs):
            return self.function(*inputs)

    monkeypatch.setattr(graphs, "replays", lambda tensors: True)
    monkeypatch.setattr(graphs, "_RecordedGraph", Recorded)
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    for key in ("a", "b"):
        graphs.replayed(lambda x: (x,), (torch.zeros(1),), lambda key=key: key)
    graphs._POOLS[torch.device("cuda", 0)] = (0, 1)
    graphs.replayed(lambda x: (x,), (torch.zeros(1),), lambda: "c")  # over the limit: all dropped
    assert not graphs._POOLS and len(graphs._GRAPHS) == 1
    graphs._GRAPHS.clear()
