import pytest
import torch
from torch import nn

from lipnet.bounds import conv2d_spectral_norm, exact_conv2d_spectral_norm
from lipnet.certify import lipschitz_bound
from lipnet.nn import (
    GramConv2d,
    GramLinear,
    GramResidualConv2d,
    GramSequential,
    MaxMin,
    ScaledAvgPool2d,
    stacked_normalized_weights,
)


def trunk():
    """Equal residual convolutions, an equal plain one after a pooling (another input size),
    and layers that cannot be stacked with them."""
    return [
        GramConv2d(3, 6, 3, padding=1), MaxMin(),
        GramResidualConv2d(6, 3), MaxMin(),
        GramResidualConv2d(6, 3), MaxMin(),
        GramResidualConv2d(6, 3), MaxMin(),
        ScaledAvgPool2d(2),
        GramResidualConv2d(6, 3), MaxMin(),  # same stack key, bounded for 4x4 instead of 8x8
        GramResidualConv2d(6, 3),
        nn.Flatten(), GramLinear(6 * 16, 10),
    ]


def pair(dtype=torch.float64):
    torch.manual_seed(0)
    layers = trunk()
    for layer in layers:
        for p in layer.parameters():
            p.data = torch.randn_like(p) * 0.3
    layers = [layer.to(dtype) for layer in layers]
    return GramSequential(*layers, stack_bounds=True), nn.Sequential(*layers)


def test_training_forward_and_gradients_equal_the_plain_sequential(stack_calls):
    stacked, plain = pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = stacked(x)
    grads = torch.autograd.grad(out.square().sum(), list(stacked.parameters()))
    reference = plain(x)
    expected = torch.autograd.grad(reference.square().sum(), list(plain.parameters()))
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-14)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    # One stack of all five residual convolutions assumed at 8x8, then the two after the
    # pooling bounded again together at 4x4 (the later sizes are not known in advance).
    assert stack_calls == [(5, (8, 8)), (2, (4, 4))]


def test_each_layer_is_one_lipschitz_on_the_size_it_sees():
    stacked, _ = pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sizes = {}
    handles = [m.register_forward_pre_hook(lambda m, a: sizes.__setitem__(m, tuple(a[0].shape[-2:])))
               for m in stacked if isinstance(m, GramResidualConv2d)]
    stacked.eval()
    stacked(x)  # record the sizes (in eval mode hooks are fine)
    for h in handles:
        h.remove()
    stacked.train()
    weights = {}
    for index, module in enumerate(stacked):
        if isinstance(module, GramResidualConv2d):
            original = module._forward_normalized
            module._forward_normalized = (lambda i, f: lambda x, w: (weights.__setitem__(i, w), f(x, w))[1])(index,
                                                                                                            original)
    stacked(x)
    assert len(weights) == 5
    for index, weight in weights.items():
        norm = exact_conv2d_spectral_norm(weight.detach(), sizes[stacked[index]], padding="same")
        assert norm <= 1 + 1e-9


def test_eval_mode_is_the_plain_sequential_and_certifies(stack_calls):
    stacked, plain = pair()
    stacked.eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(stacked(x), plain(x))
    assert stack_calls == []
    assert lipschitz_bound(stacked, (3, 8, 8)) <= 1 + 1e-5


def test_hooked_children_run_as_modules(stack_calls):
    stacked, plain = pair()
    seen = []
    stacked[2].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = stacked(x)
    assert len(seen) == 1
    torch.testing.assert_close(out, plain(x), rtol=1e-12, atol=1e-14)
    assert stack_calls == [(4, (8, 8)), (2, (4, 4))]  # the hooked layer left out of the stack


def test_no_stack_without_equal_layers(stack_calls):
    net = GramSequential(GramConv2d(3, 4, 3, padding=1), MaxMin(), GramConv2d(4, 4, 3, stride=2, padding=1),
                         stack_bounds=True)
    net(torch.randn(1, 3, 8, 8))
    assert stack_calls == []


def test_stacking_is_used_off_the_cpu_by_default_or_when_asked(stack_calls):
    layers = [GramResidualConv2d(4, 3), MaxMin(), GramResidualConv2d(4, 3)]
    x = torch.randn(1, 4, 8, 8)
    GramSequential(*layers)(x)  # CPU input: each layer bounds itself
    GramSequential(*layers, stack_bounds=False)(x)
    assert stack_calls == []
    GramSequential(*layers, stack_bounds=True)(x)
    assert stack_calls == [(2, (8, 8))]
    with pytest.raises(ValueError, match="stack_bounds"):
        GramSequential(*layers, stack_bounds="yes")
    head = GramSequential(*layers, stack_bounds=True)[:2]
    assert isinstance(head, GramSequential) and head.stack_bounds is True and len(head) == 2
    inner = GramSequential(*layers)
    outer = GramSequential(inner, stack_bounds=False)
    assert outer[0] is inner and inner.stack_bounds is None  # indexing a child leaves it alone


def test_stacked_network_traces_as_one_graph():
    import torch._dynamo

    torch._dynamo.reset()
    stacked, _ = pair(torch.float32)
    explanation = torch._dynamo.explain(stacked)(torch.rand(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_stacked_weights_need_one_stack_key():
    with pytest.raises(ValueError, match="stack_key"):
        stacked_normalized_weights([GramConv2d(4, 4, 3, padding=1), GramConv2d(4, 4, 3, padding=2)], (8, 8))
    with pytest.raises(ValueError, match="stack_key"):
        stacked_normalized_weights([GramLinear(4, 4), GramLinear(4, 4)], None)
    assert stacked_normalized_weights([], (8, 8)) == []


def test_a_diverged_layer_in_a_stack_is_named():
    convs = [GramResidualConv2d(4, 3) for _ in range(3)]
    with torch.no_grad():
        convs[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="GramResidualConv2d: the weight contains NaN"):
        stacked_normalized_weights(convs, (8, 8))
    convs[1].check_finite = False  # that layer opted out of the check (and its host synchronization)
    weights = stacked_normalized_weights(convs, (8, 8))
    assert torch.isnan(weights[1]).all() and torch.isfinite(weights[0]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_stack_is_normalized_as_each_layer_alone(dtype):
    """Rounded to float16/bfloat16, each quotient is checked and kept finite as a layer alone
    does: the same weights, none NaN where the operator is zero (taps that read only padding:
    a bound of 0), and each applied operator <= 1 at float32's accuracy."""
    torch.manual_seed(0)
    convs = [GramConv2d(4, 4, 3, padding=1).to(dtype) for _ in range(3)]
    with torch.no_grad():
        convs[1].weight.zero_()
        convs[1].weight[:, :, 0, 0] = torch.randn(4, 4)  # reads only padding on a 1 x 1 input
        for conv in (convs[0], convs[2]):
            conv.weight.mul_(30)
    for size in [(1, 1), (5, 5)]:
        stacked = stacked_normalized_weights(convs, size)
        for conv, weight in zip(convs, stacked):
            assert torch.equal(weight, conv.normalized_weight(size))
            assert not weight.isnan().any()
            exact = exact_conv2d_spectral_norm(weight.double(), size, padding=1)
            assert exact <= 1 + 1e-5
    assert exact_conv2d_spectral_norm(stacked_normalized_weights(convs, (1, 1))[1].double(), (1, 1), padding=1) == 0


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e30), (torch.float64, 1e300)])
def test_a_huge_weight_reading_only_padding_is_finite_in_a_stack(dtype, value):
    """A stack divides by at least max|W| / (M / 2) as a layer alone does: a bound of 0 (taps that
    read only zero padding) once overflowed W / TINY to inf and the forward to NaN."""
    convs = [GramConv2d(2, 2, 3, padding=1, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        convs[0].weight.zero_()
        convs[0].weight[:, :, 0, 0] = value
    stacked = stacked_normalized_weights(convs, (1, 1))
    for conv, weight in zip(convs, stacked):
        assert torch.isfinite(weight).all()
        assert torch.equal(weight, conv.normalized_weight((1, 1)))


def test_a_subclass_with_its_own_bound_is_not_stacked():
    class Looser(GramConv2d):
        def _operator_norm(self, weight, input_size, n_iter, exhaustive=False):
            return 2 * super()._operator_norm(weight, input_size, n_iter, exhaustive)

    assert Looser(4, 4, 3, padding=1).stack_key() is None
    assert GramConv2d(4, 4, 3, padding=1).stack_key() == GramConv2d(4, 4, 3, padding=1).stack_key()
    assert GramConv2d(4, 4, 3, padding=1).stack_key() != GramConv2d(4, 4, 3, padding=1, n_iter=6).stack_key()
    assert GramLinear(4, 4).stack_key() is None


def test_state_dict_keys_are_those_of_nn_sequential():
    stacked, _ = pair()
    assert list(stacked.state_dict()) == list(nn.Sequential(*trunk()).state_dict())


def test_stacked_bounds_under_torch_func_ensembles_and_per_example_gradients():
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    nets = [GramSequential(*[GramConv2d(3, 3, 3, padding=1, dtype=torch.float64) for _ in range(3)],
                           stack_bounds=True) for _ in range(2)]
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    params, buffers = stack_module_state(nets)
    outputs = vmap(lambda p, b, x: functional_call(nets[0], (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, x)
    torch.testing.assert_close(outputs, torch.stack([net(x) for net in nets]))

    def loss(p, xi):
        return functional_call(nets[0], p, (xi[None],)).sin().sum()
    own = {name: p.detach() for name, p in nets[0].named_parameters()}
    per_example = vmap(grad(loss), in_dims=(None, 0))(own, x)
    for i in range(len(x)):
        nets[0].zero_grad()
        nets[0](x[i:i + 1]).sin().sum().backward()
        for name, p in nets[0].named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, msg=name)


@pytest.mark.parametrize("stack_bounds", [True, False, None])
def test_a_parametrized_weight_is_computed_once_per_training_forward(stack_bounds, count_weight_reads):
    """A parametrization computes its weight anew at every read, and some advance a state at each
    (``spectral_norm``'s power iteration) or draw anew (DropConnect): a stacked forward must read each
    weight once, as ``nn.Sequential`` does, whether the layer is stacked (the two equal residual
    convolutions at 8 x 8), bounded alone after all (the third, which sees 4 x 4, and the plain
    convolution, whose key no other layer shares) or not a Gram layer with a key (the dense head)."""
    torch.manual_seed(0)
    layers = trunk()
    del layers[6:8]  # two equal residual convolutions at 8 x 8, then one at 4 x 4 and one alone
    counters = {index: count_weight_reads(layer) for index, layer in enumerate(layers)
                if isinstance(layer, (GramConv2d, GramLinear))}
    net = GramSequential(*layers, stack_bounds=stack_bounds).train()
    net(torch.randn(2, 3, 8, 8))
    assert {index: counter.reads for index, counter in counters.items()} == dict.fromkeys(counters, 1)


def test_stacked_weights_take_one_read_per_layer():
    """Weights passed in are the ones bounded and divided (not a new read of ``conv.weight``)."""
    convs = [GramConv2d(4, 4, 3, padding=1) for _ in range(2)]
    with pytest.raises(ValueError, match="1 weights for 2 layers"):
        stacked_normalized_weights(convs, (8, 8), [convs[0].weight])
    given = [torch.randn_like(conv.weight) for conv in convs]
    for weight, normalized in zip(given, stacked_normalized_weights(convs, (8, 8), given)):
        torch.testing.assert_close(normalized, weight / conv2d_spectral_norm(weight, (8, 8), padding=1))
