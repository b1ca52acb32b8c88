"""Shared fixtures of the training tests."""

import pytest

from lipnet.data import synthetic_dataset, write_npz


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic MNIST in .npz files: 96 training images (three batches of 32), 16 test
    images. A test module that needs more defines its own ``data_dir``."""
    folder = tmp_path_factory.mktemp("data")
    write_npz(synthetic_dataset("mnist", 96, split="train", seed=0), folder / "train.npz")
    write_npz(synthetic_dataset("mnist", 16, split="test", seed=1), folder / "test.npz")
    return folder
