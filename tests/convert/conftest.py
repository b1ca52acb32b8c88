"""Shared fixture of the convert tests."""

import pytest

from lipnet.certify.lipschitz import _REGISTRY
from lipnet.convert.conversion import _TRACED_TYPES


@pytest.fixture
def registry():
    """The registry of lipnet.certify, restored after the test: convert registers traced bounds for
    the container types it meets, process-wide (tests/certify/test_network_fuzz.py reads the registry)."""
    saved, traced = dict(_REGISTRY), set(_TRACED_TYPES)
    yield _REGISTRY
    _REGISTRY.clear()
    _REGISTRY.update(saved)
    _TRACED_TYPES.clear()
    _TRACED_TYPES.update(traced)
