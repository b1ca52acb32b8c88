"""Places where a user following the docs met behaviour the code had to change (helper 72's
walkthrough of the documentation). The bugs it found are fixed, and tested here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


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


# Each once failed inside lipnet: numpy pair and list labels with "too many values to unpack", a Dataset
# of single examples with "input size must be an int or a pair of ints ... got (8,)", dict batches and
# int labels with AttributeError.
@pytest.mark.parametrize("form", list(_forms()))
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


# Both once raised AttributeError ('numpy.ndarray' object has no attribute 'dim'; 'list' ... 'shape').
@pytest.mark.parametrize("form", ["numpy", "labels as a list"])
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


# Each once failed inside torch.export ("inputs[0] is a tuple, but dynamic_shapes[0] is a dict").
@pytest.mark.parametrize("wrapper", ["AveragedModel", "DataParallel", "torch.compile"])
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
