"""Mutation-testing gaps of lipnet.export.exporter: the input shape is validated, and the export's
self-check refuses a rebuilt model that does not reproduce the original."""

import numpy as np
import pytest
import torch
from torch import nn

from lipnet import export
from lipnet.nn import GramLinear


def test_a_bool_in_the_input_shape_is_refused():
    """``True`` is an int in Python, but not a size: ``(True, 4)`` is refused with the advice,
    before any tracing."""
    with pytest.raises(ValueError, match="input_shape must be a non-empty sequence of positive ints"):
        export(nn.Sequential(nn.Flatten(), GramLinear(4, 2)), (True, 4))


def test_numpy_and_torch_integers_in_the_input_shape_are_sizes_as_lipschitz_bound_takes_them():
    model = nn.Sequential(nn.Flatten(), GramLinear(4, 2))
    assert export(model, (np.int64(1), torch.tensor(4))).input_shape == (1, 4)
    with pytest.raises(ValueError, match="input_shape must be"):
        export(model, (1, 4.0))  # not truncated to 4


class _Rebuilt(nn.Module):
    """The model the runtime rebuilt, with ``change`` applied to its output: a stand-in for a
    runtime that does not reproduce the original."""

    def __init__(self, model, change):
        super().__init__()
        self.model, self.change = model, change

    def forward(self, x):
        return self.change(self.model(x))


@pytest.mark.parametrize("change", [
    lambda y: y + 1e-3,
    lambda y: torch.full_like(y, float("nan")),
    lambda y: y[None],  # another shape with the same values (broadcasts against the original)
], ids=["off", "nan", "shape"])
def test_a_rebuilt_model_that_differs_from_the_original_is_a_runtime_error(monkeypatch, change):
    """The export compares the rebuilt model with the original at batch sizes 2, 3 and 1. Outputs
    off by more than a few ulps, NaN outputs (no difference is small) and outputs of another shape
    are a bug of the export, reported as a ``RuntimeError``, and not blamed on the model's batch-1
    behaviour (the ``ValueError`` for a difference at batch size 1 only)."""
    from lipnet.export import runtime

    build = runtime.build
    monkeypatch.setattr(runtime, "build", lambda archive: _Rebuilt(build(archive), change))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        export(nn.Sequential(GramLinear(4, 2)), (4,), certify=False)


def test_a_rebuilt_model_within_a_few_ulps_of_large_outputs_is_accepted(monkeypatch):
    """Kernels that are not bitwise reproducible (accelerators) move an output by a few units in
    the last place of its magnitude: the self-check's tolerance scales with the outputs (here
    about 1000), so a relative difference of two ulps passes."""
    from lipnet.export import runtime

    model = nn.Sequential(GramLinear(4, 2))
    with torch.no_grad():
        model[0].bias.fill_(1000.0)
    build = runtime.build
    monkeypatch.setattr(runtime, "build", lambda archive: _Rebuilt(build(archive),
                                                                   lambda y: y * (1 + 2 * torch.finfo(y.dtype).eps)))
    x = torch.randn(3, 4)
    exported = export(model, (4,), certify=False)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-6, atol=0)


def test_a_gram_layer_with_a_forward_assigned_to_the_instance_is_refused():
    """Export replaces a Gram layer by a plain one of its normalized weight, which computes the
    class's ``forward``: a ``forward`` assigned to the instance (a wrapper's patch) would be
    dropped silently, so it is refused, naming the layer."""
    model = nn.Sequential(GramLinear(4, 2))
    model[0].forward = lambda x: 2 * GramLinear.forward(model[0], x)
    with pytest.raises(ValueError, match="overrides GramLinear.forward"):
        export(model, (4,), certify=False)


def test_the_metadata_records_the_dtype_and_the_model():
    """The archive's metadata says in which dtype the exported weights are (the dtype its inputs
    must have) and which model class was exported."""
    model = nn.Sequential(GramLinear(4, 2)).double()
    exported = export(model, (4,), certify=False)
    assert exported.metadata["dtype"] == "float64"
    assert exported.metadata["model"] == "Sequential"


def test_grouped_convolutions_export_and_reproduce_the_model():
    """A grouped convolution's weight holds ``in_channels / groups`` input channels (a transposed
    one's, ``out_channels / groups`` outputs): the archive must declare the layers' full channel
    counts, so that the runtime rebuilds them with the weights' shapes and the same outputs."""
    from lipnet.nn import GramConv2d, GramConvTranspose2d

    torch.manual_seed(0)
    model = nn.Sequential(GramConv2d(4, 4, 3, padding=1, groups=2), GramConvTranspose2d(4, 4, 2, stride=2, groups=2))
    exported = export(model, (4, 3, 3), certify=False)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=0, atol=0)


class _TiedLinear(nn.Module):
    """A linear layer whose weight is used a second time, without its bias (weight tying)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + nn.functional.linear(x, self.fc.weight)


def test_a_weight_used_by_two_calls_exports_both_calls():
    """A weight used by two calls (one with the layer's bias, one without) is not one module: each
    call is exported as it is, and the export reproduces the model."""
    torch.manual_seed(0)
    model = _TiedLinear()
    exported = export(model, (4,), certify=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


def test_a_convolution_with_other_strides_per_axis_reproduces_the_model():
    """A stride of ``(1, 2)`` (rows, then columns) is declared in the archive as the layer has it:
    the rebuilt layer gives the model's output shape and values."""
    from lipnet.nn import GramConv2d

    torch.manual_seed(0)
    model = nn.Sequential(GramConv2d(2, 2, 3, stride=(1, 2), padding=1))
    exported = export(model, (2, 4, 6), certify=False)
    x = torch.randn(2, 2, 4, 6)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=0, atol=0)


class _BorrowedBias(nn.Module):
    """A call with one layer's weight and another layer's bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return nn.functional.linear(x, self.a.weight, self.b.bias)


def test_a_call_with_another_layers_bias_keeps_that_bias():
    """A linear call whose bias is another layer's is not that weight's layer: exported as it is,
    it adds ``b.bias``, not ``a.bias``, and the export reproduces the model."""
    torch.manual_seed(0)
    model = _BorrowedBias()
    exported = export(model, (4,), certify=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


class _Twice(nn.Module):
    """One Gram convolution applied at two spatial sizes (8 x 8, then 4 x 4)."""

    def __init__(self):
        super().__init__()
        from lipnet.nn import GramConv2d

        self.conv = GramConv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x)[..., ::2, ::2])


def test_a_layer_applied_at_two_sizes_is_named_not_blamed_on_the_input_shape():
    """The error names the layer and its two sizes, as it is raised; it is not wrapped in the
    message for a model that does not accept the input shape (which is fine here)."""
    with pytest.raises(ValueError, match=r"^layer 'conv' is applied with inputs of spatial sizes \(8, 8\) and \(4, 4\)"):
        export(_Twice(), (2, 8, 8), certify=False)


class _ToFloat32(nn.Module):
    """A dtype conversion, which torch.export records with a metadata assertion on its input."""

    def forward(self, x):
        return x.to(torch.float32)


def test_a_model_that_converts_its_input_exports():
    """torch.export pins a ``.to(dtype)`` with an ``_assert_tensor_metadata`` node (device and
    dtype of the export): the exporter drops these assertions, which are not computations."""
    torch.manual_seed(0)
    model = nn.Sequential(_ToFloat32(), GramLinear(4, 2))
    exported = export(model, (4,), certify=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


class _Shift(nn.Module):
    """A buffer used twice."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x):
        return x * self.s + self.s


def test_a_buffer_used_twice_exports():
    """A stored tensor read by two operations is stored, and read, once in the archive."""
    model = nn.Sequential(_Shift(), GramLinear(4, 2))
    exported = export(model, (4,), certify=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


def test_a_complex_buffer_with_nan_is_named():
    """A complex buffer with NaN makes the outputs NaN as a real one does: it is named at export."""
    model = nn.Sequential(GramLinear(4, 2))
    model.register_buffer("phase", torch.tensor([complex(float("nan"), 0.0)]))
    with pytest.raises(ValueError, match="'phase' .* contains NaN"):
        export(model, (4,), certify=False)


@pytest.mark.parametrize("value, what", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_non_finite_weight_is_named_with_what_it_holds(value, what):
    """The error says whether the weight holds NaN or inf."""
    model = nn.Sequential(GramLinear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = value
    with pytest.raises(ValueError, match=f"contains {what},"):
        export(model, (4,), certify=False)


def test_an_export_under_inference_mode_reproduces_the_model():
    """Called under ``torch.inference_mode()`` (as serving code may be), the export copies the
    model outside it: the Gram layers' weight cache needs version counters, which inference
    tensors lack."""
    torch.manual_seed(0)
    model = nn.Sequential(GramLinear(4, 2))
    with torch.inference_mode():
        exported = export(model, (4,), certify=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)
