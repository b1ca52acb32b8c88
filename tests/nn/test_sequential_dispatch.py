"""GramSequential stacks a child's bound only when calling the child would compute nothing else:
hooks, forward overrides (class or instance) and call overrides make the child run itself."""

import types

import pytest
import torch
from torch import nn

import lipnet.nn.sequential as sequential
from lipnet.nn import GramConv2d, GramSequential, MaxMin


class HalvedForward(GramConv2d):
    def forward(self, input):
        return 0.5 * super().forward(input)


class HalvedCall(GramConv2d):
    def __call__(self, input):
        return 0.5 * super().__call__(input)


class HalvedWeight(GramConv2d):
    def normalized_weight(self, input_size=None):
        return 0.5 * super().normalized_weight(input_size)


def make_net(first=GramConv2d, stack_bounds=True):
    torch.manual_seed(0)
    return GramSequential(first(4, 4, 3, padding=1), MaxMin(), GramConv2d(4, 4, 3, padding=1), MaxMin(),
                          GramConv2d(4, 4, 3, padding=1), stack_bounds=stack_bounds)


def halve_instance_forward(net):
    original = net[0].forward
    net[0].forward = lambda input: 0.5 * original(input)


def halve_instance_forward_method(net):
    net[0].forward = types.MethodType(lambda self, input: 0.5 * GramConv2d.forward(self, input), net[0])


@pytest.fixture
def stacked_calls(monkeypatch):
    """The layers passed to each stacked bound computation, as indices into the net."""
    calls = []
    stack = sequential.stacked_normalized_weights

    def spy(layers, input_size, weights=None):
        calls.append(list(layers))
        return stack(layers, input_size, weights)

    monkeypatch.setattr(sequential, "stacked_normalized_weights", spy)
    return calls


def run(net):
    return net(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_())


@pytest.mark.parametrize("first, patch", [
    (HalvedForward, None), (HalvedCall, None), (HalvedWeight, None),
    (GramConv2d, halve_instance_forward), (GramConv2d, halve_instance_forward_method),
])
def test_an_overridden_child_runs_itself(first, patch, stacked_calls):
    outputs = []
    for stack_bounds in (False, True):
        net = make_net(first, stack_bounds)
        if patch is not None:
            patch(net)
        outputs.append(run(net))
    torch.testing.assert_close(outputs[1], outputs[0])
    assert all(net[0] not in layers for layers in stacked_calls)
    assert [net[2], net[4]] in stacked_calls  # the others are still stacked


@pytest.mark.parametrize("register", [
    lambda m, fired: m.register_full_backward_hook(lambda *args: fired.append(m)),
    lambda m, fired: m.register_full_backward_pre_hook(lambda *args: fired.append(m)),
])
def test_a_child_with_a_backward_hook_runs_itself(register, stacked_calls):
    net = make_net()
    fired = []
    register(net[0], fired)
    run(net).sum().backward()
    assert fired == [net[0]]
    assert all(net[0] not in layers for layers in stacked_calls)
    assert [net[2], net[4]] in stacked_calls


@pytest.mark.parametrize("register", [
    nn.modules.module.register_module_full_backward_hook,
    nn.modules.module.register_module_full_backward_pre_hook,
])
def test_global_backward_hooks_fire_for_every_child(register, stacked_calls):
    net = make_net()
    fired = []
    handle = register(lambda module, *args: fired.append(module))
    try:
        run(net).sum().backward()
    finally:
        handle.remove()
    assert all(any(module is child for module in fired) for child in net)
    assert stacked_calls == []

