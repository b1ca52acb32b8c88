import contextlib
import sys
from pathlib import Path

import pytest
import torch

# The fuzz scripts (tests/fuzz_*.py, also run as programs) import as top-level modules, as
# they do when run: ``import fuzz_geometry``.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one thread: torch.export's tracing and small tensors are several times
    faster without OpenMP's waits (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flushed_denormals():
    """``torch.set_flush_denormal(True)`` (a CPU speed setting: subnormal results and operands read as
    0) during the test, off again after; skipped where the CPU cannot flush."""
    if not torch.set_flush_denormal(True):
        pytest.skip("flushing denormals is not supported on this CPU")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture
def default_device():
    """``with default_device("meta"): ...``: ``torch.set_default_device`` for a block of the test (the
    models and data built before it stay where they are), back to none after it."""
    @contextlib.contextmanager
    def setting(device):
        torch.set_default_device(device)
        try:
            yield
        finally:
            torch.set_default_device(None)

    return setting


@pytest.fixture
def stack_calls(monkeypatch):
    """``(number of layers, input size)`` of every stacked bound computation of a GramSequential."""
    from lipnet.nn import sequential

    calls = []
    original = sequential.stacked_normalized_weights

    def counted(layers, size, weights=None):
        calls.append((len(layers), size))
        return original(layers, size, weights)

    monkeypatch.setattr(sequential, "stacked_normalized_weights", counted)
    return calls
