"""Red-team of lipnet.export: false certificates, tampered archives, unsafe loading.

What the round-trip fuzz (tests/fuzz_export.py) does not cover: the stored bound against the
exported network's exact Jacobian norm (float64, at random and adversarial inputs), low
precision models, archives edited in ways the existing tests do not try (overlapping tensors,
training-mode operators, a lowered bound, scaled weights), and models export must refuse.
"""

import resource

import pytest
import torch
from torch import nn

from lipnet import convert, export
from lipnet.certify import certified_accuracy, certified_radius, lipschitz_bound
from lipnet.export import runtime
from lipnet.nn import (
    ConvexResidual,
    GlobalL2NormPool2d,
    GramConv1d,
    GramConv2d,
    GramConvTranspose2d,
    GramLinear,
    GramResidualConv2d,
    GramSequential,
    GroupSort,
    InputNormalization,
    L2NormPool2d,
    MaxMin,
    ScaledAvgPool2d,
)

SHAPE = (2, 6, 6)


pytestmark = pytest.mark.usefixtures("one_thread")


class _Skip(nn.Module):
    """A container with its own forward, which lipnet.convert bounds by tracing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return (x + self.conv(x).relu()) / 2


def _nets():
    """``(name, model, input shape)``: each layer kind lipnet certifies, in small networks."""
    flat = 8 * 3 * 3
    yield "zeros, stride 2, dilation 2, groups 2", nn.Sequential(
        GramConv2d(2, 4, 3, padding=2, dilation=2), MaxMin(), GramConv2d(4, 8, 3, stride=2, padding=1, groups=2),
        GroupSort(4), nn.Flatten(), GramLinear(flat, 5)), SHAPE
    yield "circular, residual, convex residual, L2 pool", nn.Sequential(
        InputNormalization([0.4, 0.6], [0.3, 0.2]), GramConv2d(2, 4, 3, padding=1, padding_mode="circular"), MaxMin(),
        GramResidualConv2d(4, 3), MaxMin(),
        ConvexResidual(nn.Sequential(GramConv2d(4, 4, 3, padding=1), MaxMin()), 0.3),
        L2NormPool2d(2), GramConv2d(4, 8, 1), GlobalL2NormPool2d(), nn.Flatten(), GramLinear(8, 5)), SHAPE
    yield "transposed, batch norm, upsample, scaled avg pool", nn.Sequential(
        GramConv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), MaxMin(),
        GramConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1), MaxMin(), ScaledAvgPool2d(2),
        nn.Upsample(scale_factor=2), nn.Flatten(), nn.Unflatten(1, (4, 6, 6)), nn.Flatten(), GramLinear(144, 5)), SHAPE
    yield "GramSequential stacked, 1-D", GramSequential(
        GramConv1d(3, 4, 3, padding=1), GramConv1d(4, 4, 3, padding=1, stride=2), nn.Flatten(),
        GramLinear(16, 6), GramLinear(6, 5), stack_bounds=True), (3, 8)
    yield "lipnet.convert of a residual container", convert(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), _Skip(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 5)),
        input_shape=SHAPE).model, SHAPE


def _train(model, shape, seed):
    """A few Adam steps: random initial weights leave most bounds far from tight."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, *shape, generator=generator)
    y = torch.randint(0, 5, (32,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in model.modules():  # BatchNorm statistics away from (0, 1)
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.3, 3, generator=generator)
    return model.eval()


def _jacobian_norm(network, x):
    jacobian = torch.autograd.functional.jacobian(lambda v: network(v.unsqueeze(0))[0], x)
    return float(torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), ord=2))


def _adversarial_quotient(network, x, steps=25):
    """The largest ``||f(a) - f(b)|| / ||a - b||`` met by gradient ascent from ``a = x``, ``b`` near it
    (a lower bound of the Lipschitz constant that needs no derivative: lipnet's networks are
    piecewise linear, so ``||J(x) v||`` has zero gradient in ``x``)."""
    a = x.clone()
    b = x + 0.1 * torch.randn_like(x)
    best = 0.0
    for _ in range(steps):
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        quotient = (network(a.unsqueeze(0)) - network(b.unsqueeze(0))).norm() / (a - b).norm()
        best = max(best, float(quotient.detach()))
        grad_a, grad_b = torch.autograd.grad(quotient, (a, b))
        a = a + 0.05 * grad_a / (grad_a.norm() + 1e-12)
        b = b + 0.05 * grad_b / (grad_b.norm() + 1e-12)
    return best


@pytest.mark.parametrize("index", range(5))
def test_stored_bound_is_at_least_the_exported_networks_float64_jacobian_norm(index):
    """Every layer kind: the exported float64 network computes the model's function bitwise, its
    stored bound equals lipnet.certify's and is >= the exact Jacobian norm at random inputs and at
    inputs pushed towards a larger norm; the metadata's radius is never above lipnet's."""
    name, model, shape = list(_nets())[index]
    torch.manual_seed(index)
    model = _train(model, shape, seed=index).double()
    exported = export(model, shape)
    generator = torch.Generator().manual_seed(10 + index)
    xs = torch.randn(6, *shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(exported(xs), model(xs)), name
    assert exported.lipschitz_bound == float(lipschitz_bound(model, shape)), name
    norms = [_jacobian_norm(exported.network, x) for x in xs[:3]]
    norms.append(_adversarial_quotient(exported.network, xs[3]))
    assert max(norms) <= exported.lipschitz_bound, (name, norms, exported.lipschitz_bound)
    assert max(norms) >= 0.02 * exported.lipschitz_bound, (name, norms)  # the check is not vacuous
    logits = exported(xs)
    radius = exported.certified_radius(logits)
    assert bool((radius <= certified_radius(logits, logits.argmax(1), lipschitz_bound(model, shape))).all())


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect", "replicate"])
def test_every_padding_mode_exports_with_a_bound_at_least_its_exact_norm(padding_mode):
    """Reflect and replicate padding read border pixels twice (deel-torchlip's export lost its
    1-Lipschitz guarantee there): single-tap kernels at each position, which concentrate the
    copies (norm up to sqrt 2 under the zero-padding normalization), and random ones with stride,
    dilation and groups; exact norm of the exported float64 operator <= stored bound."""
    kernels = []
    for tap in ((0, 0), (0, 1), (1, 1), (2, 2)):
        kernel = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
        kernel[:, 0, tap[0], tap[1]] = 1.0
        kernels.append((dict(padding=1, groups=2), kernel))
    generator = torch.Generator().manual_seed(0)
    for options in (dict(padding=1, stride=2), dict(padding=2, dilation=2), dict(padding=1, groups=2)):
        kernels.append((options, torch.randn(2, 2 // options.get("groups", 1), 3, 3, generator=generator,
                                             dtype=torch.float64)))
    for options, kernel in kernels:
        conv = GramConv2d(2, 2, 3, padding_mode=padding_mode, bias=False, **options).double()
        with torch.no_grad():
            conv.weight.copy_(kernel)
        exported = export(nn.Sequential(conv).eval(), (2, 5, 5))
        exact = _jacobian_norm(exported.network, torch.zeros(2, 5, 5, dtype=torch.float64))  # linear: any point
        assert exact <= exported.lipschitz_bound, (options, kernel, exact, exported.lipschitz_bound)
        assert exact >= 0.2, (options, exact)  # not a vacuous check


@pytest.mark.parametrize("index", range(5))
def test_float32_radii_are_at_most_lipnets_proven_radii(index):
    """The runtime's radius of a float32 forward (a heuristic rounding allowance) against
    lipnet.certify.certified_accuracy's (a float64 pass with a proven error bound), with the
    generic formula: never larger on 64 inputs of each network (measured: at most 0.9997 times)."""
    name, model, shape = list(_nets())[index]
    torch.manual_seed(index)
    model = _train(model, shape, seed=index)
    exported = export(model, shape)
    x = torch.rand(64, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = exported(x)
    proven = certified_accuracy(model, (x, logits.argmax(1)), last_layer="none", progress=False)
    assert proven.lipschitz == exported.lipschitz_bound
    radius = exported.certified_radius(logits)
    same = proven.correct  # the float64 pass predicts the same class
    assert int(same.sum()) >= 60, name
    assert bool((radius[same] <= proven.radii[same]).all()), (name, float((radius[same] - proven.radii[same]).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models_export_bitwise_with_the_bound_of_their_weights(dtype):
    name, model, shape = list(_nets())[1]
    torch.manual_seed(0)
    model = _train(model, shape, seed=0).to(dtype)
    exported = export(model, shape)
    x = torch.randn(4, *shape).to(dtype)
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
    assert exported.lipschitz_bound == float(lipschitz_bound(model, shape))
    assert runtime.build(exported.archive()).lipschitz_bound == exported.lipschitz_bound


def _plain_net():
    torch.manual_seed(0)
    return _train(nn.Sequential(GramConv2d(2, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(144, 5)), SHAPE, 0)


def test_tensors_overlapping_in_their_storage_are_refused_before_any_allocation():
    """A stride-0 tensor is a few bytes in the file but 1 GiB to the finiteness check: loading
    such an 8 KiB file took 1.8 GiB before the check; two names for one storage are refused too."""
    archive = export(_plain_net(), SHAPE).archive()
    bomb = {**archive["state_dict"], "bomb": torch.zeros(1).expand(2 ** 14, 2 ** 14)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="overlap"):
        runtime.build({**archive, "state_dict": bomb})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    assert grown_mib < 128, f"refusing the archive took {grown_mib:.0f} MiB"
    name, weight = next((k, v) for k, v in archive["state_dict"].items() if v.dim() == 2)
    expanded = {**archive["state_dict"], name: torch.zeros(1).expand_as(weight)}  # 4 bytes for 2880
    aliased = {**archive["state_dict"], "alias": archive["state_dict"][name].view(-1)}
    for state_dict in (expanded, aliased):
        with pytest.raises(ValueError, match="overlap"):
            runtime.build({**archive, "state_dict": state_dict})
    indices = torch.zeros(2, 1, dtype=torch.long)  # one value, 2**40 elements once densified
    sparse = {**archive["state_dict"], name: torch.sparse_coo_tensor(indices, torch.ones(1), (2 ** 20, 2 ** 20),
                                                                  check_invariants=True)}
    with pytest.raises(ValueError, match="not dense"):
        runtime.build({**archive, "state_dict": sparse})


def _with_first_node(archive, node, stored=None):
    """The archive with ``node`` (named like the input) applied to the input before the graph."""
    placeholder, *body = archive["nodes"]
    raw = dict(placeholder, name="raw_input")
    gets = [{"name": k, "op": "get_attr", "target": k, "args": [], "kwargs": {}} for k in stored or {}]
    node = {"name": placeholder["name"], "op": "call_function", "kwargs": {}, **node}
    return {**archive, "nodes": [raw, *gets, node, *body], "state_dict": {**archive["state_dict"], **(stored or {})}}


def _training_mode_nodes(train):
    raw = {"$node": "raw_input"}
    stats = {"mean": torch.zeros(2), "var": torch.ones(2)}
    return [
        ({"target": "aten.dropout.default", "args": [raw, 0.5, train]}, None),
        ({"target": "aten.dropout.default", "args": [raw, 0.5], "kwargs": {"train": train}}, None),
        ({"target": "aten.feature_alpha_dropout.default", "args": [raw, 0.5, train]}, None),
        ({"target": "aten.rrelu.default", "args": [raw, 0.1, 0.3, train]}, None),
        ({"target": "aten.batch_norm.default",
          "args": [raw, None, None, {"$node": "mean"}, {"$node": "var"}, train, 0.5, 1e-5, False]}, stats),
    ]


@pytest.mark.parametrize("case", range(5))
def test_operators_in_training_mode_are_refused_in_a_certified_archive(case):
    """Dropout (random at every call) and batch norm with training=True (the batch's statistics)
    in a file that claims a bound were loaded; an uncertified one may keep them."""
    archive = export(_plain_net(), SHAPE).archive()
    node, stored = _training_mode_nodes(True)[case]
    with pytest.raises(ValueError, match="training"):  # batch norm: also its write to the statistics
        runtime.build(_with_first_node(archive, node, stored))
    node, stored = _training_mode_nodes(False)[case]  # the same graph in eval mode loads and is a function
    model = runtime.build(_with_first_node(archive, node, stored))
    x = torch.rand(3, *SHAPE)
    assert torch.equal(model(x), model(x))


def test_batch_norm_in_training_mode_on_stored_statistics_is_refused_even_without_a_bound():
    """aten.batch_norm(training=True) updates running_mean and running_var in place, which its
    schema does not mark, so the write check missed it: the loaded network's outputs changed at
    every call. The same operator without stored statistics (BatchNorm2d(track_running_stats=
    False), exported with certify=False) still loads."""
    archive = {**export(_plain_net(), SHAPE).archive(), "lipschitz_bound": None}
    node, stored = _training_mode_nodes(True)[4]
    with pytest.raises(ValueError, match="writes to the stored tensor it takes as running_mean"):
        runtime.build(_with_first_node(archive, node, stored))
    node = dict(node, args=[{"$node": "raw_input"}, None, None, None, None, True, 0.5, 1e-5, False])
    model = runtime.build(_with_first_node(archive, node))
    x = torch.rand(3, *SHAPE)
    assert torch.equal(model(x), model(x))
    dropout, _ = _training_mode_nodes(True)[0]  # Monte Carlo dropout in an inference-only export
    assert runtime.build(_with_first_node(archive, dropout)).lipschitz_bound is None


def test_a_bound_or_weights_edited_by_a_large_factor_are_refused_at_load(tmp_path):
    """A checksum-consistent file can claim any bound, but not one below a norm of the
    network's Jacobian that load computes: lowering the bound 10 times, or scaling the weights
    by 3 (Jacobian norm 5.03 against a bound of 1.00; 0.56 against 0.10), were loaded and certified radii 10 or 3
    times too large."""
    exported = export(_plain_net(), SHAPE)
    archive = exported.archive()
    assert runtime.build(archive).lipschitz_bound == exported.lipschitz_bound
    with pytest.raises(ValueError, match="lipschitz_bound .* is false"):
        runtime.build({**archive, "lipschitz_bound": exported.lipschitz_bound / 10})
    scaled = {k: v * 3 if k.endswith("weight") else v for k, v in archive["state_dict"].items()}
    path = tmp_path / "scaled.pt"
    torch.save({**archive, "state_dict": scaled}, path)  # consistent checksums: only the content lies
    with pytest.raises(ValueError, match="lipschitz_bound .* is false"):
        runtime.load(path)
    assert runtime.build({**archive, "lipschitz_bound": None}).lipschitz_bound is None  # nothing to check


def test_a_network_whose_outputs_are_all_checked_gets_its_exact_jacobian_norm():
    """Up to JACOBIAN_ROWS outputs, the load-time check computes ``||J||`` itself (Q orthogonal):
    a linear network claiming 0.999 of its exact norm is refused, one claiming the norm loads."""
    torch.manual_seed(0)
    model = nn.Sequential(GramLinear(6, 4)).double().eval()
    exported = export(model, (6,))
    exact = float(torch.linalg.matrix_norm(exported.network.state_dict()["0.weight"], ord=2))
    archive = exported.archive()
    assert runtime.build({**archive, "lipschitz_bound": exact * (1 + 1e-9)}).lipschitz_bound > 0
    with pytest.raises(ValueError, match="is false"):
        runtime.build({**archive, "lipschitz_bound": exact * 0.99})


def test_a_model_on_the_meta_device_is_a_value_error_naming_a_tensor():
    """It was a RuntimeError from Tensor.item() inside the finiteness check."""
    with pytest.raises(ValueError, match="'0.weight' is on the meta device"):
        export(nn.Sequential(GramLinear(4, 3)).to("meta"), (4,))


class _DoubledLinear(GramLinear):
    def forward(self, input):
        return 2 * super().forward(input)


def test_a_gram_layer_with_its_own_forward_is_refused_with_a_value_error():
    """Export bakes GramLinear.forward as written: with certify=False this raised RuntimeError
    'please report this as a bug' (the baked copy computed half the model's output)."""
    with pytest.raises(ValueError, match=r"layer '1' \(_DoubledLinear\): it overrides GramLinear.forward"):
        export(nn.Sequential(nn.Flatten(), _DoubledLinear(6, 3)), (6,), certify=False)
    shared = GramLinear(6, 6)  # a layer used twice: one plain layer, bounded twice
    model = nn.Sequential(shared, MaxMin(), shared).eval()
    exported = export(model, (6,))
    x = torch.randn(3, 6)
    assert torch.equal(exported(x), model(x)) and exported.lipschitz_bound == float(lipschitz_bound(model, (6,)))


class _BatchDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = GramLinear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        return 100 * y if x.shape[0] == 1 else y


def test_a_forward_that_depends_on_the_batch_size_is_refused():
    """torch.export traces at batch 2 and assumes a dynamic size is never 1: the export computed
    y where the model computed 100 y at batch size 1, and the self-check (batches 2 and 3) passed."""
    with pytest.raises(ValueError, match="batch size 1"):
        export(_BatchDependent().eval(), (4,), certify=False)


def test_reordered_or_dangling_graph_nodes_are_value_errors():
    archive = export(_plain_net(), SHAPE).archive()
    first, *body, output = archive["nodes"]
    for nodes in ([first, *reversed(body), output], [first, *body[1:], output], [first, output, *body]):
        with pytest.raises(ValueError):
            runtime.build({**archive, "nodes": nodes})


def test_a_certified_network_that_mixes_the_examples_of_a_batch_is_refused():
    """Adding the batch mean to each output (a network with no per-example function, so no
    bound of one) loaded with the file's bound; without a bound it still loads."""
    archive = export(_plain_net(), SHAPE).archive()
    *body, output = archive["nodes"]
    mixed = [{"name": "batch_mean", "op": "call_function", "target": "aten.mean.dim",
              "args": [output["args"][0], [0], True], "kwargs": {}},
             {"name": "mixed", "op": "call_function", "target": "aten.add.Tensor",
              "args": [output["args"][0], {"$node": "batch_mean"}], "kwargs": {}},
             {**output, "args": [{"$node": "mixed"}]}]
    with pytest.raises(ValueError, match="other examples of its batch"):
        runtime.build({**archive, "nodes": [*body, *mixed]})
    assert runtime.build({**archive, "nodes": [*body, *mixed], "lipschitz_bound": None}).lipschitz_bound is None


def test_the_load_checks_run_on_a_network_that_writes_to_its_input():
    """A first module in place (SiLU(inplace=True)) overwrites its input: the load checks run on
    copies (else the batch check compared different inputs, and the Jacobian's leaf refused the
    in-place write, which skipped the bound check)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.SiLU(inplace=True), GramLinear(6, 4), MaxMin(), GramLinear(4, 3)).eval()
    archive = export(model, (6,)).archive()
    assert runtime.build(archive).lipschitz_bound == archive["lipschitz_bound"]
    with pytest.raises(ValueError, match="is false"):
        runtime.build({**archive, "lipschitz_bound": archive["lipschitz_bound"] / 10})
