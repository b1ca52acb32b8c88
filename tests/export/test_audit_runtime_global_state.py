"""Red team: export, the runtime and convert under torch state the caller set first
(inference mode, a default device)."""

import io

import pytest
import torch
from torch import nn

import lipnet
from lipnet.export import runtime
from lipnet.nn import GramConv2d, GramLinear, MaxMin


def _net():
    torch.manual_seed(0)
    return nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(4 * 4 * 4, 3)).eval()


def test_a_bound_edited_to_a_hundredth_is_refused_under_inference_mode():
    """The runtime checks a stored bound against the norm of the network's Jacobian, which takes a
    gradient: under the caller's torch.inference_mode() none could be taken, the check returned
    silently, and a bound divided by 100 (every radius 100 times too large) was accepted."""
    archive = lipnet.export(_net(), (1, 4, 4)).archive()
    archive["lipschitz_bound"] /= 100
    buffer = io.BytesIO()
    torch.save(archive, buffer)
    for build in (lambda: runtime.build(archive), lambda: runtime.load(io.BytesIO(buffer.getvalue()))):
        with torch.inference_mode():
            try:
                build()
            except ValueError as error:
                assert "is false" in str(error)
            else:
                raise AssertionError("a bound 100 times too small was accepted")


def test_an_export_loads_and_certifies_under_inference_mode():
    exported = lipnet.export(_net(), (1, 4, 4))
    buffer = io.BytesIO()
    exported.save(buffer)
    x = torch.rand(3, 1, 4, 4)
    with torch.inference_mode():
        loaded = runtime.load(io.BytesIO(buffer.getvalue()))
        radii = loaded.certified_radius(loaded(x))
    assert loaded.lipschitz_bound == exported.lipschitz_bound
    assert torch.equal(radii, exported.certified_radius(exported(x)))


def test_export_and_convert_work_under_inference_mode():
    """Both deep-copied the model inside the caller's inference mode: the copy's parameters were
    inference tensors, on which the Gram layers' weight cache (version counters) raised, reported as
    "the model does not accept inputs of shape (batch, 1, 4, 4)"; convert's result would have had
    parameters that cannot be trained."""
    net = _net()
    plain = lipnet.export(net, (1, 4, 4))
    with torch.inference_mode():
        exported = lipnet.export(net, (1, 4, 4))
        converted = lipnet.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), input_shape=(1, 5, 5))
    assert exported.lipschitz_bound == plain.lipschitz_bound
    assert not any(p.is_inference() for p in converted.model.parameters())
    converted.model(torch.rand(2, 1, 5, 5)).sum().backward()  # trainable


def test_export_and_the_runtime_radius_under_a_default_device(default_device):
    """Under torch.set_default_device("meta") export drew its probe inputs on the meta device ("Cannot
    copy out of meta tensor"), the runtime's checks too (reported as a malformed archive), and the
    runtime's radius asked the default device whether the CPU flushes subnormals (under "cuda" the
    GPU would have answered for the CPU)."""
    net = _net()
    plain = lipnet.export(net, (1, 4, 4))
    x = torch.rand(3, 1, 4, 4)
    logits = plain(x)
    plain_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with default_device("meta"):
        exported = lipnet.export(net, (1, 4, 4))
        radii = plain.certified_radius(logits)
        converted = lipnet.convert(plain_net, input_shape=(1, 5, 5))
        assert torch.get_default_device().type == "meta"
    assert exported.lipschitz_bound == plain.lipschitz_bound
    assert torch.equal(radii, plain.certified_radius(logits))
    assert converted.report.lipschitz_bound is not None


def test_the_runtime_radius_refuses_torch_func_transforms():
    """Under torch.func.vmap the runtime's radius failed with vmap's own "data-dependent control flow"
    error (``bool`` of a batched tensor), which does not say to compute radii outside the transform."""
    exported = lipnet.export(_net(), (1, 4, 4))
    logits = exported(torch.rand(3, 1, 4, 4))
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.vmap(lambda row: exported.certified_radius(row[None]))(logits)
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.grad(lambda z: exported.certified_radius(z[None]).sum())(logits[0])
