"""Where a run computes: the device names a run accepts, and why it refuses the others."""

import pytest
import torch

from lipnet.training import resolve_device


def test_cpu_and_auto_are_accepted():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name, message", [
    ("meta", "cannot train on 'meta'"), ("cpu:1", "cannot train on 'cpu:1'"), ("tpu", "unknown device 'tpu'"),
    (f"cuda:{torch.cuda.device_count()}", "CUDA|no GPU"),
])
def test_devices_a_run_cannot_use_are_refused_by_name(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)
