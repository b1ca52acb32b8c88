"""certified_accuracy: one pass, every data form, bounds computed once, results consistent."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipnet.certify.accuracy as accuracy_module
from lipnet.certify import certified_accuracy, certified_radius, lipschitz_bound, split_last_linear
from lipnet.nn import GramLinear, MaxMin
from lipnet.nn.normalized import GramNormalized


def test_matches_the_radii_of_the_whole_data_and_is_consistent(trained_net, blobs):
    net = trained_net
    x, y = blobs(seed=1)
    result = certified_accuracy(net, (x, y), eps=[0.0, 0.05, 0.2], batch_size=50, progress=False)
    body, last = split_last_linear(net)
    with torch.no_grad():
        logits = net(x)
    expected = certified_radius(logits, y, last_layer=last, body_lipschitz=lipschitz_bound(body, (1, 8, 8)))
    whole = certified_accuracy(net, (x, y), eps=[0.0], batch_size=len(x), progress=False)
    torch.testing.assert_close(result.radii, whole.radii, rtol=1e-12, atol=0)  # batch sizes differ
    # From float32 logits with the heuristic allowance: the same radii up to that allowance.
    torch.testing.assert_close(result.radii, expected, rtol=2e-3, atol=1e-6)
    assert result.clean_accuracy == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert result.clean_accuracy > 0.9 and result.certified[1] > 0.3  # a trained model certifies something
    assert list(result.certified) == sorted(result.certified, reverse=True)
    assert result.certified[0] <= result.clean_accuracy
    assert result.certified_accuracy(0.05) == result.certified[1]
    assert torch.all(result.radii[~result.correct] == 0)
    assert result.lipschitz == lipschitz_bound(net, (1, 8, 8))
    assert result.body_lipschitz == lipschitz_bound(body, (1, 8, 8))


def test_radii_hold_against_random_perturbations(trained_net, blobs):
    net = trained_net
    x, y = blobs(64, seed=2)
    result = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
    with torch.no_grad():
        for _ in range(20):
            delta = torch.randn_like(x)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * result.radii.float().view(-1, 1, 1, 1)
            moved = net(x + 0.999 * delta).argmax(dim=1)
            assert torch.all((moved == y) | (result.radii == 0))


def test_generic_form_is_never_tighter_than_last_layer_form(trained_net, blobs):
    net = trained_net
    x, y = blobs(seed=3)
    auto = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
    generic = certified_accuracy(net, (x, y), eps=[0.1], last_layer="none", progress=False)
    assert generic.body_lipschitz is None and auto.body_lipschitz is not None
    assert torch.all(generic.radii <= auto.radii)
    assert generic.to_dict()["radius"] == "generic"


def test_every_data_form_gives_the_same_result(trained_net, blobs):
    net = trained_net
    x, y = blobs(100, seed=4)
    images = (x * 255).round().to(torch.uint8)
    reference = certified_accuracy(net, (images.float() / 255, y), eps=[0.1], progress=False)
    forms = [
        (images, y),
        [images, y],
        SimpleNamespace(images=images, labels=y),
        DataLoader(TensorDataset(images, y), batch_size=32),
        ((images[i:i + 40], y[i:i + 40]) for i in range(0, 100, 40)),
    ]
    for data in forms:
        result = certified_accuracy(net, data, eps=[0.1], progress=False, batch_size=30)
        torch.testing.assert_close(result.radii, reference.radii, rtol=0, atol=1e-12)


def test_bounds_are_computed_once_and_modes_restored(monkeypatch, small_net, blobs):
    net = small_net.train()
    calls = []
    with_modules = accuracy_module.module_lipschitz_bounds
    monkeypatch.setattr(accuracy_module, "module_lipschitz_bounds",
                        lambda *a, **k: calls.append(a) or with_modules(*a, **k))
    x, y = blobs(120)
    certified_accuracy(net, (x, y), batch_size=10, progress=False)
    assert len(calls) == 2  # the model and its body, once for 12 batches
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_progress_bar_can_be_disabled(capsys, small_net, blobs):
    net = small_net
    x, y = blobs(20)
    certified_accuracy(net, (x, y), progress=False)
    assert capsys.readouterr().err == ""
    certified_accuracy(net, (x, y), progress=True)
    assert "certify" in capsys.readouterr().err


def test_to_dict_is_json(small_net, blobs):
    net = small_net
    x, y = blobs(20)
    summary = certified_accuracy(net, (x, y), eps=[36 / 255], progress=False).to_dict()
    assert json.loads(json.dumps(summary))["certified_accuracy"][0]["eps"] == pytest.approx(36 / 255)
    assert summary["n"] == 20 and summary["input_shape"] == [1, 8, 8]


def test_model_without_a_last_linear_layer_uses_the_generic_form(blobs):
    net = nn.Sequential(nn.Flatten(), GramLinear(64, 4), MaxMin())
    result = certified_accuracy(net, blobs(20), progress=False)
    assert result.body_lipschitz is None and split_last_linear(net) is None


def test_bad_input_is_rejected(small_net, blobs):
    net = small_net
    x, y = blobs(20)
    with pytest.raises(ValueError, match="one input shape"):
        certified_accuracy(net, [(x, y), (torch.rand(4, 1, 6, 6), y[:4])], progress=False)
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy(net, [], progress=False)
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(net, (x, y), eps=[-0.1], progress=False)
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(net, (x, y[:5]), progress=False)
    with pytest.raises(ValueError, match="last_layer"):
        certified_accuracy(net, (x, y), last_layer="yes", progress=False)
    with pytest.raises(ValueError, match="model.to"):
        certified_accuracy(net, (x, y), device="meta", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu(trained_net, blobs):
    net = trained_net
    x, y = blobs(seed=5)
    cpu = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
    gpu = certified_accuracy(net.cuda(), (x, y), eps=[0.1], progress=False)
    assert gpu.clean_accuracy == cpu.clean_accuracy
    torch.testing.assert_close(gpu.radii, cpu.radii, rtol=1e-4, atol=1e-5)
    assert abs(gpu.lipschitz - cpu.lipschitz) <= 1e-6


def test_mixed_train_and_eval_modes_are_restored_exactly(small_net, blobs):
    small_net.train()
    small_net[1].eval()
    certified_accuracy(small_net, blobs(8), progress=False)
    assert [m.training for m in small_net.modules()] == [True, True, False, True, True, True, True, True]


def test_the_last_layer_form_needs_a_plain_linear_map(small_net, blobs):
    class Scaled(GramLinear):  # a correct bound, but the rows are no longer the applied map
        def forward(self, x):
            return 10 * super().forward(x)

        def lipschitz_bound(self, input_size=None):
            return 10 * super().lipschitz_bound(input_size)

    net = small_net.eval()
    last = net[-1]
    scaled = Scaled(last.in_features, last.out_features)
    scaled.load_state_dict(last.state_dict())
    assert split_last_linear(net) is not None
    tampered = nn.Sequential(*list(net)[:-1], scaled)
    assert split_last_linear(tampered) is None
    result = certified_accuracy(tampered, blobs(32), eps=[0.1], progress=False)
    assert result.body_lipschitz is None and result.lipschitz >= 10
    handle = last.register_forward_hook(lambda module, inputs, output: output)
    try:
        assert split_last_linear(net) is None
    finally:
        handle.remove()


def test_module_bounds_name_every_bounded_layer(trained_net, blobs):
    """Each module bounded as a unit, in order, with its path and certified bound; the Gram
    layers' bounds (of the weights they apply) are at most 1 up to the float64 margin, and
    the product of all of them is the model's bound."""
    x, y = blobs(20)
    result = certified_accuracy(trained_net, (x, y), eps=[0.1], progress=False, last_layer="none")
    table = result.module_bounds
    paths = [name for name, _ in trained_net.named_modules()]
    assert [entry["module"] for entry in table] == [p for p in paths if p in {e["module"] for e in table}]
    assert {entry["type"] for entry in table} >= {"GramConv2d", "GramLinear"}
    product = 1.0
    for entry in table:
        assert entry["lipschitz"] > 0
        assert entry["normalized"] == entry["type"].startswith("Gram")
        if entry["normalized"]:
            assert entry["lipschitz"] <= 1 + 1e-5
        product *= entry["lipschitz"]
    assert product == pytest.approx(result.lipschitz, rel=1e-9)
    from lipnet.certify.cli import format_table

    assert "Gram layers: 3, product of their bounds" in format_table(result)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["module_bounds"][0]["module"] == table[0]["module"]
    assert summary["module_bounds"][0]["input_shape"] == list(table[0]["input_shape"])


def test_integer_labels_of_any_dtype_and_empty_batches_are_accepted(small_net, blobs):
    """uint8 / int32 labels crashed (gather, one_hot); an empty batch of a loader raised an
    IndexError in the rounding bound."""
    x, y = blobs(20)
    expected = certified_accuracy(small_net, (x, y), eps=[0.1], progress=False)
    for dtype in (torch.uint8, torch.int32):
        result = certified_accuracy(small_net, (x, y.to(dtype)), eps=[0.1], progress=False)
        assert torch.equal(result.radii, expected.radii) and result.certified == expected.certified
    result = certified_accuracy(small_net, [(x[:0], y[:0]), (x, y), (x[:0], y[:0])], eps=[0.1], progress=False)
    assert torch.equal(result.radii, expected.radii) and result.clean_accuracy == expected.clean_accuracy
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy(small_net, [(x[:0], y[:0])], progress=False)


def test_a_single_radius_may_be_given_as_a_number(small_net, blobs):
    """eps=0.1 raised TypeError: 'float' object is not iterable."""
    x, y = blobs(20)
    single = certified_accuracy(small_net, (x, y), eps=0.1, progress=False)
    assert single.eps == (0.1,) and single.certified == certified_accuracy(small_net, (x, y), eps=[0.1],
                                                                           progress=False).certified
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(small_net, (x, y), eps="0.1", progress=False)


def test_a_device_naming_the_models_device_is_accepted(small_net, blobs):
    """device='cpu:0' for a model on the CPU was refused ('the model is on cpu but device=cpu:0');
    likewise device='cuda' must send the batches to the model's own GPU, not the current one."""
    x, y = blobs(10)
    expected = certified_accuracy(small_net, (x, y), eps=[0.1], progress=False)
    result = certified_accuracy(small_net, (x, y), eps=[0.1], device="cpu:0", progress=False)
    assert torch.equal(result.radii, expected.radii)


def test_an_empty_batch_of_another_shape_does_not_set_the_input_shape(small_net, blobs):
    """The bounds were computed for the shape of the first batch even when it was empty."""
    x, y = blobs(10)
    result = certified_accuracy(small_net, [(torch.zeros(0, 64), y[:0]), (x, y)], eps=[0.1], progress=False)
    assert result.input_shape == (1, 8, 8) and result.n == 10


def test_a_plain_linear_last_layer_is_certified_in_the_last_layer_form(trained_net, blobs):
    """An unconstrained last layer (its per-pair constants ||w_y - w_j|| are what the last-layer
    radius uses) once failed with UnknownModuleError: no rule bounds a plain nn.Linear. Its own
    bound (Gram in float64 with the rounding margin) enters the generic constant and the rounding."""
    x, y = blobs(seed=3)
    last = trained_net[-1]
    plain = nn.Linear(last.in_features, last.out_features, dtype=last.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(3 * last.normalized_weight())  # norm 3: a free layer, not a normalized one
        plain.bias.copy_(last.bias)
    net = nn.Sequential(*trained_net[:-1], plain).eval()
    body = nn.Sequential(*trained_net[:-1]).eval()
    result = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
    body_lipschitz = lipschitz_bound(body, (1, 8, 8))
    exact_last = float(torch.linalg.matrix_norm(plain.weight.double(), 2))
    assert result.body_lipschitz == body_lipschitz
    assert exact_last * body_lipschitz <= result.lipschitz <= exact_last * body_lipschitz * (1 + 1e-5)
    with torch.no_grad():
        logits = net(x)
    expected = certified_radius(logits, y, last_layer=plain, body_lipschitz=body_lipschitz)
    torch.testing.assert_close(result.radii, expected, rtol=2e-3, atol=1e-6)
    assert result.certified[0] > 0.3
    with torch.no_grad():  # the radii hold against random moves of their length
        for _ in range(20):
            delta = torch.randn_like(x)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * result.radii.float().view(-1, 1, 1, 1)
            assert torch.all((net(x + 0.999 * delta).argmax(dim=1) == y) | (result.radii == 0))
    with torch.no_grad():
        plain.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_accuracy(net, (x, y), eps=[0.1], progress=False)


def test_each_layer_is_bounded_once_per_certification(trained_net, blobs, monkeypatch):
    """The whole model's bound and the body's (last-layer form) share their layers' float64 bounds:
    each Gram layer's exhaustive bound, the costly part, was computed twice."""
    calls = []
    original = GramNormalized.lipschitz_bound

    def counted(self, input_size=None):
        calls.append(type(self).__name__)
        return original(self, input_size)

    monkeypatch.setattr(GramNormalized, "lipschitz_bound", counted)
    x, y = blobs(seed=4)
    result = certified_accuracy(trained_net, (x, y), eps=[0.1], progress=False)
    gram_layers = [m for m in trained_net.modules() if isinstance(m, GramNormalized)]
    assert len(calls) == len(gram_layers) and result.body_lipschitz is not None


def test_examples_with_non_finite_logits_are_named_by_their_index_in_the_data():
    """A NaN pixel in one example of a large data set: the error names that example (its index across
    batches) and says its input is at fault, instead of only refusing the batch."""
    from lipnet.nn import GramLinear

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), GramLinear(4, 3))
    x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
    x[7, 0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf for 1 example\(s\) \(index in data: 7\), of which 1 have NaN"):
        certified_accuracy(net, (x, y), eps=[0.1], batch_size=3, progress=False)
    x = x.double()
    x[7] = 1.7e308  # finite inputs whose logits overflow: 4 x 1.7e308 / sqrt(12) each
    with torch.no_grad():
        net[1].weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"index in data: 7\), of which 0 have"):
        certified_accuracy(net.double(), (x, y), eps=[0.1], batch_size=4, progress=False)


def test_a_model_with_complex_logits_is_refused_with_a_reason():
    """Logits made complex by the last module: refused with lipnet's reason, not torch's
    "argmax(): does not support complex input" after radii of the real parts."""
    class TimesI(nn.Module):
        def forward(self, x):
            return x * 1j

        def lipschitz_bound(self):
            return 1.0

    net = nn.Sequential(GramLinear(4, 4), TimesI())
    x, y = torch.rand(6, 4), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match="logits are complex"):
        certified_accuracy(net, (x, y), eps=[0.1], progress=False)
