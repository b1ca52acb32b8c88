"""Places where a user following the docs meets behaviour the code should change (helper 72's
walkthrough of the documentation). Each test passes once the code is fixed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.xfail(strict=True, reason="BUG: `import lipnet.export.runtime as rt` raises ImportError "
                   "(\"cannot import name 'runtime' from 'export' (unknown location)\"): the function "
                   "lipnet.export shadows the package, and Python resolves the `as` form through attributes")
def test_runtime_imports_with_as():
    """export.md has `from lipnet.export import runtime`; the equivalent `import ... as` must work too.
    Run in a fresh interpreter, so that no earlier import changes the outcome."""
    code = "import lipnet.export.runtime as rt; import lipnet.convert.report as rep; print(rt.load, rep.ConversionReport)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-500:]


def _tiny_net():
    from lipnet.nn import GramConv2d, GramLinear, MaxMin

    torch.manual_seed(0)
    return nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(4 * 8 * 8, 3))


def _forms():
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10) % 3
    return {
        "numpy pair": (x.numpy(), y.numpy()),
        "labels as a list": (x, y.tolist()),
        "a Dataset of single examples": torch.utils.data.TensorDataset(x, y),
        "batches as dicts": [{"image": x, "label": y}],
        "an int label per batch": [(x[i:i + 1], int(y[i])) for i in range(10)],
    }


_WHY = {
    "numpy pair": "'too many values to unpack (expected 2)': the pair is taken for an iterable of batches",
    "labels as a list": "'too many values to unpack (expected 2)'",
    "a Dataset of single examples": "each example is taken for a batch: 'input size must be an int or a pair of "
                                    "ints ... got (8,)', with no word of DataLoader",
    "batches as dicts": "AttributeError: 'str' object has no attribute 'to'",
    "an int label per batch": "AttributeError: 'int' object has no attribute 'to'",
}


@pytest.mark.parametrize("form", [pytest.param(name, marks=pytest.mark.xfail(
    strict=True, reason=f"BUG: certified_accuracy(model, data) with {name}: {why}")) for name, why in _WHY.items()])
def test_certified_accuracy_names_the_data_it_takes(form):
    """api.md: `data` is `(x, y)` tensors, an iterable of `(x, y)` batches such as a `DataLoader`, or an
    `ImageDataset`. Other forms are certified as meant, or refused with a message that names those forms."""
    from lipnet.certify import certified_accuracy

    try:
        result = certified_accuracy(_tiny_net(), _forms()[form], eps=[0.1], progress=False)
    except (TypeError, ValueError) as error:
        assert "(x, y)" in str(error) or "DataLoader" in str(error), str(error)
    else:
        assert len(result.radii) == 10


@pytest.mark.parametrize("form", [
    pytest.param("numpy", marks=pytest.mark.xfail(strict=True, reason="BUG: certified_radius(numpy_logits, numpy_labels, L) "
                                                  "raises AttributeError: 'numpy.ndarray' object has no attribute 'dim'")),
    pytest.param("labels as a list", marks=pytest.mark.xfail(strict=True, reason="BUG: certified_radius(logits, [0, 1, 2], L) "
                                                             "raises AttributeError: 'list' object has no attribute 'shape'")),
])
def test_certified_radius_names_the_types_it_takes(form):
    """Logits and labels that are not tensors are converted, or refused with a TypeError or ValueError that says
    tensors are expected, not an AttributeError from inside."""
    from lipnet.certify import certified_radius

    logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), torch.arange(3)
    args = (logits.numpy(), labels.numpy()) if form == "numpy" else (logits, labels.tolist())
    try:
        radii = certified_radius(*args, 1.0)
    except (TypeError, ValueError) as error:
        assert "tensor" in str(error).lower(), str(error)
    else:
        assert torch.allclose(radii, certified_radius(logits, labels, 1.0))


@pytest.mark.xfail(strict=True, reason="BUG: lipschitz_bound(model, 4) raises \"TypeError: 'int' object is not "
                   "iterable\", where export(model, 4) and convert(model, input_shape=4) say what input_shape must be")
def test_lipschitz_bound_names_input_shape_when_given_an_int():
    from lipnet.certify import lipschitz_bound
    from lipnet.nn import GramLinear

    model = nn.Sequential(GramLinear(4, 3))
    try:
        bound = lipschitz_bound(model, 4)
    except (TypeError, ValueError) as error:
        assert "input_shape" in str(error), str(error)
    else:
        assert bound == lipschitz_bound(model, (4,))


@pytest.mark.xfail(strict=True, reason="BUG: a Sequential ending in a plain nn.Linear (what coming-from-other-libraries.md "
                   "suggests for unit-row last layers) is certified by certified_accuracy, which reports "
                   "a whole-model bound (result.lipschitz, the layer's float64 Gram bound included), but "
                   "lipschitz_bound raises UnknownModuleError on the same model and export refuses it")
def test_plain_last_linear_is_bounded_as_certified_accuracy_bounds_it():
    from lipnet import export
    from lipnet.certify import certified_accuracy, lipschitz_bound
    from lipnet.nn import GramConv2d, MaxMin

    torch.manual_seed(0)
    net = nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 3
    result = certified_accuracy(net, (x, y), eps=[0.01], progress=False)
    bound = lipschitz_bound(net, (1, 8, 8))
    assert bound >= float(torch.linalg.matrix_norm(net[-1].weight.double(), 2)) * 0.999
    assert bound == pytest.approx(result.lipschitz, rel=1e-3)
    assert export(net, input_shape=(1, 8, 8)).lipschitz_bound == bound


@pytest.mark.parametrize("wrapper", [
    pytest.param("AveragedModel", marks=pytest.mark.xfail(strict=True, reason=(
        "BUG: export(AveragedModel(net), shape) fails inside torch.export ('could not trace the model with a dynamic "
        "batch dimension: ... inputs[0] is a tuple, but dynamic_shapes[0] is a dict'), though lipschitz_bound and "
        "certified_accuracy take the EMA model (api.md) and export.md says every module type lipnet.certify "
        "accepts exports; export(lipnet.models.unwrap(ema), shape) works"))),
    pytest.param("DataParallel", marks=pytest.mark.xfail(strict=True, reason=(
        "BUG: export(nn.DataParallel(net), shape) fails with the same torch.export error, though lipschitz_bound "
        "takes the wrapped model"))),
    pytest.param("torch.compile", marks=pytest.mark.xfail(strict=True, reason=(
        "BUG: export(torch.compile(net), shape) fails with the same torch.export error, though lipschitz_bound "
        "takes a compiled model (api.md)"))),
])
def test_export_takes_the_wrappers_certify_takes(wrapper):
    from torch.optim.swa_utils import AveragedModel

    from lipnet import export
    from lipnet.certify import lipschitz_bound
    from lipnet.nn import GramLinear, MaxMin

    net = nn.Sequential(nn.Flatten(), GramLinear(16, 8), MaxMin(), GramLinear(8, 3))
    wrapped = {"AveragedModel": AveragedModel, "DataParallel": nn.DataParallel, "torch.compile": torch.compile}[wrapper](net)
    exported = export(wrapped, input_shape=(1, 4, 4))
    assert exported.lipschitz_bound == lipschitz_bound(wrapped, (1, 4, 4))
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(exported(x), wrapped(x))
