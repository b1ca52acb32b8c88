"""Places where a user following the docs meets behaviour the code should change (helper 72's
walkthrough of the documentation). Each test passes once the code is fixed."""

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
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-500:]


def _tiny_net():
    from lipnet.nn import GramConv2d, GramLinear, MaxMin

    torch.manual_seed(0)
    return nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(4 * 8 * 8, 3))


@pytest.mark.xfail(strict=True, reason="BUG: certified_accuracy(model, (x, y)) with NumPy arrays (or labels as a "
                   "list) fails with 'too many values to unpack (expected 2)': the pair is taken for an "
                   "iterable of batches; it should be accepted or refused with a message naming the forms `data` takes")
def test_certified_accuracy_names_the_data_it_takes():
    from lipnet.certify import certified_accuracy

    x, y = torch.rand(10, 1, 8, 8), torch.arange(10) % 3
    for data in [(x.numpy(), y.numpy()), (x, y.tolist())]:
        try:
            result = certified_accuracy(_tiny_net(), data, eps=[0.1], progress=False)
        except (TypeError, ValueError) as error:
            assert "tensor" in str(error), str(error)
        else:
            assert len(result.radii) == 10
