"""Mutation-testing gaps of lipnet.bounds.graphs, on the CPU: the conditions under which a bound
is replayed, the key a graph is recorded under, and what a replay returns.

``replays`` is asked about stand-ins that report a CUDA device (no GPU is needed: only their
``device`` is read), with the CUDA capture query replaced; recording is replaced by a stand-in
that runs the function, and a replay is driven through a ``_RecordedGraph`` whose CUDA graph is
a stand-in. The real capture and replay are compared with eager bounds in tests/test_cuda.py.
"""

from types import SimpleNamespace

import pytest
import torch

import lipnet
from lipnet.bounds import graphs

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def on(device, shape=(3,), dtype=torch.float32):
    """A stand-in for a tensor on ``device``: what replays and the key read."""
    return SimpleNamespace(device=device, shape=torch.Size(shape), dtype=dtype)


@pytest.fixture
def not_capturing(monkeypatch):
    state = {"capturing": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    return state


def test_replays_needs_the_setting_one_cuda_device_and_no_capture_or_compile(not_capturing, monkeypatch):
    """Only with the setting on, every tensor on the same CUDA device, no graph capture of the
    caller's in progress and not under ``torch.compile``."""
    tensors = [on(CUDA0), on(CUDA0)]
    with lipnet.bounds.cuda_graphs(False):
        assert not graphs.replays(tensors)
    with lipnet.bounds.cuda_graphs():
        assert graphs.replays(tensors)
        assert not graphs.replays([on(CUDA0), on(CUDA1)])
        assert not graphs.replays([on(CUDA0), on(torch.device("cpu"))])
        not_capturing["capturing"] = True
        assert not graphs.replays(tensors)
        not_capturing["capturing"] = False
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not graphs.replays(tensors)


class Recording:
    """Stands in for ``_RecordedGraph``: counts the recordings and runs the function."""

    made: list = []

    def __init__(self, function, inputs):
        self.function = function
        Recording.made.append(tuple(inputs))

    def __call__(self, inputs):
        return self.function(*inputs)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(graphs, "replays", lambda tensors: all(t.device.type == "cuda" for t in tensors))
    monkeypatch.setattr(graphs, "_RecordedGraph", Recording)
    monkeypatch.setattr(Recording, "made", [])
    lipnet.bounds.release_cuda_graphs()
    yield Recording.made
    lipnet.bounds.release_cuda_graphs()


def test_a_graph_is_recorded_once_per_key_shape_dtype_and_device(recording):
    """A graph holds tensors of one shape, dtype and device: each combination is recorded once
    under the caller's key, and replayed from then on (the same key with another shape, dtype or
    device records a new graph, never replays one that reads tensors of another size)."""
    inputs = [(on(CUDA0),), (on(CUDA0),), (on(CUDA0, shape=(4,)),), (on(CUDA0, dtype=torch.float64),),
              (on(CUDA1),), (on(CUDA0, shape=(4,)),)]
    for x in inputs:
        graphs.replayed(lambda t: (t,), x, lambda: "key")
    assert [made[0] for made in recording] == [inputs[i][0] for i in (0, 2, 3, 4)]
    graphs.replayed(lambda t: (t,), inputs[0], lambda: "another key")
    assert len(recording) == 5 and len(graphs._GRAPHS) == 5


def test_none_inputs_pass_through_to_the_function_and_are_not_asked_about(recording):
    """``None`` inputs are passed through: ``replays`` sees only the tensors (a CPU call with a
    ``None`` runs the function itself, and a CUDA one keys the ``None`` as such)."""
    x = torch.ones(2)
    with lipnet.bounds.cuda_graphs():
        assert graphs.replayed(lambda a, b: (b + 1, a), (None, x), lambda: "k")[1] is None
    assert not recording
    cuda = on(CUDA0)
    assert graphs.replayed(lambda a, b: (a, b), (None, cuda), lambda: "k") == (None, cuda)
    assert len(recording) == 1


def test_a_replay_copies_the_inputs_in_and_clones_the_outputs_out():
    """``_RecordedGraph.__call__``: the new inputs are copied into the graph's own tensors before
    the replay, and each output is a fresh tensor (the next replay overwrites the graph's own)."""
    recorded = object.__new__(graphs._RecordedGraph)
    recorded.inputs = [torch.zeros(3), None]
    recorded.outputs = (torch.zeros(3), None)

    def replay():
        recorded.outputs[0].copy_(recorded.inputs[0] * 2)

    recorded.graph = SimpleNamespace(replay=replay)
    first = recorded([torch.tensor([1.0, 2.0, 3.0]), None])
    second = recorded([torch.tensor([5.0, 5.0, 5.0]), None])
    assert torch.equal(first[0], torch.tensor([2.0, 4.0, 6.0])) and first[1] is None
    assert torch.equal(second[0], torch.full((3,), 10.0))
    assert first[0] is not recorded.outputs[0]


def test_launches_on_cuda_are_free_only_with_the_setting_on():
    """Eager bounds on CUDA are set by their launches unless they are replayed: free with the
    setting on, not with it off (a device is only read for its type)."""
    with lipnet.bounds.cuda_graphs(False):
        assert not graphs.launches_are_free(CUDA0)
    with lipnet.bounds.cuda_graphs():
        assert graphs.launches_are_free(CUDA0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls of ``_RecordedGraph.__init__`` replaced by stand-ins on CPU tensors: pool
    handles counted, each capture noted with its pool, the warm-up and capture run eagerly."""
    from contextlib import contextmanager, nullcontext

    state = {"pools": 0, "captures": []}

    def pool_handle():
        state["pools"] += 1
        return ("pool", state["pools"])

    @contextmanager
    def capture(graph, pool=None, capture_error_mode=None):
        state["captures"].append(pool)
        yield

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", pool_handle)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(graphs, "_POOLS", {})
    return state


def test_a_recorded_graph_reads_its_own_copies_and_shares_one_pool_per_device(fake_cuda):
    """Recording copies the inputs into tensors of the graph's own (the caller's may change or be
    freed after the call), and every graph of a device captures into the same memory pool."""
    x = torch.ones(3)
    first = graphs._RecordedGraph(lambda t, none: (t * 2, none), [x, None])
    second = graphs._RecordedGraph(lambda t: (t + 1,), [torch.zeros(2)])
    x.fill_(7.0)
    assert first.inputs[0] is not x and torch.equal(first.inputs[0], torch.ones(3)) and first.inputs[1] is None
    assert not first.inputs[0].requires_grad
    assert fake_cuda["pools"] == 1 and fake_cuda["captures"] == [("pool", 1), ("pool", 1)]
    assert len(graphs._POOLS) == 1 and second.outputs[0].shape == (2,)
