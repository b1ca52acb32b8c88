"""The benchmark scripts are not a package: each test module loads its script by path."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack_module():
    return load_script("pack_cifar10")


@pytest.fixture(scope="module")
def profile_module():
    return load_script("profile_step")


@pytest.fixture(scope="module")
def bounds_module():
    return load_script("bounds")


@pytest.fixture(scope="module")
def activations_module():
    return load_script("activations")


@pytest.fixture(scope="module")
def peers_module():
    return load_script("peers")
