"""Red-team audit: the Gram layers under the PyTorch utilities a researcher calls in their own
training loop (weight averaging, mixed precision with a gradient scaler, pruning, parametrizations,
torch.fx tools and fusions, flat parameter vectors, state dicts, hooks, torch.export).

Each test checks values: the operator norm of a layer as it runs (its dense float64 matrix from
impulse responses, SVD) is at most 1, outputs equal those of a fresh copy (nothing cached), and
refusals name the way out."""

import copy

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parameters_to_vector, parametrizations, prune, vector_to_parameters
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from lipnet.bounds import affine_map_matrix
from lipnet.certify import LipschitzBoundError, UnknownModuleError, lipschitz_bound
from lipnet.convert import traced_lipschitz_bound
from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear, GramResidualConv2d, MaxMin

F64 = torch.float64
SLACK = 1 + 1e-9  # float64 rounding of the dense matrix and its SVD
CERTIFIED = 1 + 1e-5  # lipnet's certified bound of a normalized layer: 1 up to its rounding margin


def dense_norm(fn, shape):
    """The exact operator norm of the linear part of ``fn`` on inputs of ``shape`` (one example),
    from its float64 impulse responses."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(affine_map_matrix(fn, shape), 2))


def small_net(in_channels=2, size=5):
    return nn.Sequential(GramConv2d(in_channels, 4, 3, padding=1, dtype=F64), MaxMin(), nn.Flatten(),
                         GramLinear(4 * size * size, 3, dtype=F64))


LAYERS = {
    "conv2d": (lambda: GramConv2d(2, 4, 3, padding=1, dtype=F64), (2, 5, 5)),
    "conv1d": (lambda: GramConv1d(2, 4, 3, padding=1, dtype=F64), (2, 7)),
    "conv_transpose2d": (lambda: GramConvTranspose2d(2, 4, 3, stride=2, padding=1, dtype=F64), (2, 4, 4)),
    "linear": (lambda: GramLinear(6, 4, dtype=F64), (6,)),
    "residual": (lambda: GramResidualConv2d(2, 3, dtype=F64), (2, 5, 5)),
}


# Weight averaging ---------------------------------------------------------------------------------------------------

def test_ema_of_averaged_model_follows_updates_and_each_layer_stays_one_lipschitz():
    """``AveragedModel`` with ``get_ema_multi_avg_fn`` averages the raw weights in place
    (``torch._foreach_lerp_`` on detached views, which share the version counter): the eval cache of
    the averaged copy is refreshed, and the average of raw weights is what gets normalized."""
    torch.manual_seed(0)
    net = small_net()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9)).eval()
    x, y = torch.randn(8, 2, 5, 5, dtype=F64), torch.randint(0, 3, (8,))
    with torch.no_grad():
        before = ema(x)  # fills the averaged copy's eval cache
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        ema.update_parameters(net)
    with torch.no_grad():
        after = ema(x)
        fresh = copy.deepcopy(ema.module).train()(x)  # no cache: normalizes the averaged weights now
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert dense_norm(ema.module[0], (2, 5, 5)) <= SLACK
    assert dense_norm(ema.module[3], (100,)) <= SLACK
    update_bn([(x,)], ema)  # no batch norm here: a train-mode pass that leaves the model as it was
    assert not ema.training and not ema.module[0].training
    with torch.no_grad():
        torch.testing.assert_close(ema(x), after, rtol=0, atol=0)
    assert lipschitz_bound(ema.module, (2, 5, 5)) <= CERTIFIED


def test_an_averaged_model_is_certified_as_the_model_it_averages():
    torch.manual_seed(1)
    ema = AveragedModel(small_net(), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    assert lipschitz_bound(ema, (2, 5, 5)) == lipschitz_bound(ema.module, (2, 5, 5))


def test_an_averaged_model_is_saved_as_the_model_it_averages(tmp_path):
    from lipnet.checkpoint import load_model, save_model
    from lipnet.models import build_model

    torch.manual_seed(12)
    ema = AveragedModel(build_model("convnet-xs", in_channels=1, num_classes=3, input_size=8),
                        multi_avg_fn=get_ema_multi_avg_fn(0.9))
    save_model(tmp_path / "ema.pt", ema)
    loaded, _ = load_model(tmp_path / "ema.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.module.state_dict().values()))


# Mixed precision with a gradient scaler -----------------------------------------------------------------------------

def test_grad_scaler_with_float16_autocast_skips_an_inf_step_and_a_nan_weight_raises():
    torch.manual_seed(2)
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(100, 3))
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            out = net(x)
            loss = nn.functional.cross_entropy(out.float(), y)
        assert out.dtype == torch.float16
        assert net[0].weight_norm_bound((5, 5)).dtype == torch.float32  # the bound stays in the weight's dtype
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if step == 1:
            net[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        weights = [p.detach().clone() for p in net.parameters()]
        scaler.step(optimizer)
        scaler.update()
        unchanged = all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))
        assert unchanged == (step == 1)
    assert scaler.get_scale() == 2.0 ** 9
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"), torch.autocast("cpu", dtype=torch.float16):
        net(x)


# Pruning ------------------------------------------------------------------------------------------------------------

def test_a_pruned_model_is_refused_by_certification_and_certified_after_prune_remove():
    torch.manual_seed(3)
    net = small_net()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    prune.random_unstructured(net[3], "weight", amount=0.3)
    assert list(net.state_dict()) == ["0.bias", "0.weight_orig", "0.weight_mask", "3.bias", "3.weight_orig",
                                      "3.weight_mask"]
    with pytest.raises(LipschitzBoundError, match="hooks"):
        lipschitz_bound(net, (2, 5, 5))
    masked = net[0].weight_orig.detach() * net[0].weight_mask
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    net.eval()
    with torch.no_grad():
        pruned = net(x)
        assert (net[0].normalized_weight((5, 5))[masked == 0] == 0).all()
        for index in (0, 3):
            prune.remove(net[index], "weight")
        torch.testing.assert_close(net(x), pruned, rtol=0, atol=0)
    assert lipschitz_bound(net, (2, 5, 5)) <= CERTIFIED
    assert dense_norm(net[0], (2, 5, 5)) <= SLACK


def test_the_refusal_of_a_pruned_model_names_prune_remove():
    net = small_net()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    with pytest.raises(LipschitzBoundError, match=r"prune\.remove"):
        lipschitz_bound(net, (2, 5, 5))


# Parametrizations ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_parametrized_layers_are_certified_as_they_run(name, training):
    make, shape = LAYERS[name]
    for how in ("weight_norm", "spectral_norm", "orthogonal"):
        if how == "orthogonal" and name not in ("linear",):
            continue
        torch.manual_seed(4)
        layer = make().train(training)
        getattr(parametrizations, how)(layer)
        layer(torch.randn(2, *shape, dtype=F64))
        layer.eval()
        assert dense_norm(layer, shape) <= SLACK
        assert lipschitz_bound(layer, shape) <= CERTIFIED


@pytest.mark.parametrize("name", LAYERS)
def test_a_parametrization_is_computed_once_per_forward(name, count_weight_reads):
    make, shape = LAYERS[name]
    x = torch.randn(2, *shape, dtype=F64)
    for training in (True, False):
        layer = make().train(training)
        counter = count_weight_reads(layer)
        layer(x)
        assert counter.reads == 1, (training, counter.reads)


# torch.fx tools -----------------------------------------------------------------------------------------------------

class LipnetLeaves(torch.fx.Tracer):
    def is_leaf_module(self, module, qualified_name):
        return type(module).__module__.startswith("lipnet.") or super().is_leaf_module(module, qualified_name)


@pytest.mark.parametrize("name", LAYERS)
def test_symbolic_tracing_through_a_gram_layer_is_refused_with_a_hint(name):
    make, _ = LAYERS[name]
    with pytest.raises(TypeError, match="leaf"):
        torch.fx.symbolic_trace(nn.Sequential(make()))


def test_fx_tools_with_lipnet_layers_as_leaves_leave_them_alone():
    """With lipnet's layers as leaves, torch.fx's conv-batch-norm fusion matches exact types
    (``type(m) is nn.Conv2d``) and skips the Gram layer, torchvision's feature extractor works, and
    torch.ao's eager fusion and dynamic quantization (exact-type tables) refuse or skip it; only
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` called directly folds into the raw weight
    (tests/nn/test_audit_mutation_after_construction.py::test_fused_batch_norm_is_still_normalized)."""
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(5)
    net = nn.Sequential(GramConv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), MaxMin()).eval()
    with torch.no_grad():
        net[1].running_var.fill_(0.01)
        net[1].weight.normal_()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        expected = net(x)
    fused = fuse(torch.fx.GraphModule(net, LipnetLeaves().trace(net)), no_trace=True)
    assert [type(m) for m in fused.children()] == [GramConv2d, nn.BatchNorm2d, MaxMin]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(net), [["0", "1"]])
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(GramLinear(4, 4), nn.Linear(4, 4)),
                                                       dtype=torch.qint8)
    assert type(quantized[0]) is GramLinear and type(quantized[1]) is not nn.Linear
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    extractor = feature_extraction.create_feature_extractor(
        net, return_nodes=["2"], tracer_kwargs={"leaf_modules": [GramConv2d, MaxMin]})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["2"], expected, rtol=0, atol=0)


def amplify(x):
    return 10.0 * x


torch.fx.wrap("amplify")


class Amplified(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = GramConv2d(2, 4, 3, padding=1, dtype=F64)
        self.fc = GramLinear(100, 3, dtype=F64)

    def forward(self, x):
        return self.fc(amplify(self.conv(x)).flatten(1))


def test_an_fx_wrapped_function_is_refused_by_certification_never_ignored():
    model = Amplified()
    assert dense_norm(model.eval(), (2, 5, 5)) > 1.5
    with pytest.raises(LipschitzBoundError, match="amplify"):
        traced_lipschitz_bound(model, (2, 5, 5))
    with pytest.raises((UnknownModuleError, LipschitzBoundError)):
        lipschitz_bound(model, (2, 5, 5))


# Flat parameter vectors ---------------------------------------------------------------------------------------------

def test_vector_to_parameters_from_new_vectors_refreshes_the_eval_cache():
    torch.manual_seed(6)
    layer = GramConv2d(2, 3, 3, padding=1, dtype=F64).eval()
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    with torch.no_grad():
        before = layer(x)
        vector_to_parameters(5 * torch.randn(57, dtype=F64), layer.parameters())
        after = layer(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, copy.deepcopy(layer)(x), rtol=0, atol=0)


def test_vector_to_parameters_from_a_vector_edited_in_place_refreshes_the_eval_cache():
    torch.manual_seed(7)
    layer = GramConv2d(2, 3, 3, padding=1, dtype=F64).eval()
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    vector = parameters_to_vector(layer.parameters())
    vector_to_parameters(vector, layer.parameters())
    with torch.no_grad():
        layer(x)
        vector[:54] = 5 * torch.randn(54, dtype=F64)
        vector_to_parameters(vector, layer.parameters())
        torch.testing.assert_close(layer(x), copy.deepcopy(layer)(x), rtol=0, atol=0)


# The tensor normalized_weight returns -------------------------------------------------------------------------------

def edit_in_place(weight):
    weight.mul_(3)


def wrap_and_step(weight):
    """Bake the normalized weight into a plain layer's parameter (``nn.Parameter(w)`` shares its
    memory) and take a manual gradient step there."""
    parameter = nn.Parameter(weight)
    with torch.no_grad():
        parameter.sub_(5 * torch.ones_like(parameter))


@pytest.mark.parametrize("edit", [edit_in_place, wrap_and_step], ids=["in_place", "parameter"])
@pytest.mark.parametrize("name", LAYERS)
def test_editing_the_returned_normalized_weight_leaves_the_layer_alone(name, edit):
    make, shape = LAYERS[name]
    torch.manual_seed(13)
    layer = make().eval().requires_grad_(False)
    x = torch.randn(2, *shape, dtype=F64)
    with torch.no_grad():
        expected = layer(x)
    edit(layer.normalized_weight())  # the weight of the last forward's size
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert dense_norm(layer, shape) <= SLACK


# State dicts, whole-model pickles, hooks ----------------------------------------------------------------------------

def test_load_state_dict_with_assign_and_partial_loads_refresh_the_eval_cache():
    torch.manual_seed(8)
    layer = GramConv2d(2, 4, 3, padding=1, dtype=F64).eval().requires_grad_(False)
    x = torch.randn(1, 2, 5, 5, dtype=F64)

    def fresh(module):
        return copy.deepcopy(module).train()(x)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(GramConv2d(2, 4, 3, padding=1, dtype=F64).state_dict(), assign=True)
        out = layer(x)
        assert not torch.allclose(out, before)
        torch.testing.assert_close(out, fresh(layer), rtol=0, atol=0)
        result = layer.load_state_dict({"weight": 3 * torch.randn(4, 2, 3, 3, dtype=F64)}, strict=False)
        assert result.missing_keys == ["bias"]
        torch.testing.assert_close(layer(x), fresh(layer), rtol=0, atol=0)
    assert dense_norm(layer, (2, 5, 5)) <= SLACK


def test_a_whole_model_saved_and_loaded_keeps_no_cache_and_computes_the_same(tmp_path):
    torch.manual_seed(9)
    net = small_net().eval()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    with torch.no_grad():
        out = net(x)
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    assert loaded[0]._eval_cache == {} and loaded[3]._eval_cache == {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    assert lipschitz_bound(loaded, (2, 5, 5)) == lipschitz_bound(net, (2, 5, 5))


def test_backward_hooks_and_saved_tensor_hooks_keep_the_gradients():
    torch.manual_seed(10)
    layer = GramConv2d(2, 3, 3, padding=1, dtype=F64)
    x = torch.randn(2, 2, 5, 5, dtype=F64, requires_grad=True)

    def gradients():
        layer.zero_grad()
        x.grad = None
        layer(x).sin().sum().backward()
        return layer.weight.grad.clone(), layer.bias.grad.clone(), x.grad.clone()
    plain = gradients()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        for got, expected in zip(gradients(), plain):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    calls = []
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))
    layer.register_full_backward_pre_hook(lambda module, grad_out: None)
    for got, expected in zip(gradients(), plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert calls == [1]


def test_torch_export_computes_the_bound_in_the_graph_even_from_a_cached_eval_model():
    """An eval-mode model with its cache filled exports the bound's computation, not the cached
    normalized weight: the exported program follows a new weight."""
    torch.manual_seed(11)
    layer = GramLinear(6, 4).eval().requires_grad_(False)
    x = torch.randn(2, 6)
    with torch.no_grad():
        layer(x)
    program = torch.export.export(layer, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), layer(x))
        program.get_parameter("weight").mul_(-3).add_(0.5)
        layer.weight.copy_(program.get_parameter("weight"))
        torch.testing.assert_close(program(x), layer(x))
