"""Mutation-testing follow-ups for lipnet.training.distributed: the CPU device names a run accepts."""

import pytest
import torch

from lipnet.training.distributed import resolve_device


def test_cpu_0_is_the_cpu_and_other_cpu_indices_are_refused():
    assert resolve_device("cpu:0") == torch.device("cpu", 0) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="a run cannot train on 'cpu:1'"):
        resolve_device("cpu:1")
