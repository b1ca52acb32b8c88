"""Mutation tests of :mod:`lipnet.bounds.autocast`: full float32 products inside
``ieee_float32_matmuls`` for every backend whatever the caller set, the caller's settings
restored, the legacy path of torch < 2.9, and ``autocast_disabled`` on a device without
autocast."""

import pytest
import torch

import lipnet.bounds.autocast as autocast
from lipnet.bounds.autocast import autocast_disabled, ieee_float32_matmuls

# The backends whose float32 products can be lowered, each with its lower precision (listed
# here, not taken from the module under test).
LOWERED = [(torch.backends.cuda.matmul, "tf32"), (getattr(torch.backends.mkldnn, "matmul", None), "bf16")]
LOWERED = [(backend, lower) for backend, lower in LOWERED if hasattr(backend, "fp32_precision")]
BACKENDS = [backend for backend, _ in LOWERED]


@pytest.fixture
def restore_precision():
    saved = [backend.fp32_precision for backend in BACKENDS]
    yield
    for backend, value in zip(BACKENDS, saved):
        backend.fp32_precision = value


@pytest.mark.skipif(len(BACKENDS) < 2, reason="torch < 2.9 has no per-backend fp32_precision")
@pytest.mark.parametrize("full", range(2))
def test_a_backend_left_below_full_float32_is_raised_when_another_is_full(full, restore_precision):
    """One backend already at ``"ieee"`` does not make the others so: inside, every backend
    computes full float32 products (a single lowered one, cuBLAS with TF32 or oneDNN with
    bfloat16 passes, can put a bound below the norm); on exit each has the caller's setting,
    also when the block raises."""
    for index, (backend, lower) in enumerate(LOWERED):
        backend.fp32_precision = "ieee" if index == full else lower
    before = [backend.fp32_precision for backend in BACKENDS]
    with pytest.raises(KeyError), ieee_float32_matmuls():
        assert [backend.fp32_precision for backend in BACKENDS] == ["ieee"] * len(BACKENDS)
        raise KeyError
    assert [backend.fp32_precision for backend in BACKENDS] == before


@pytest.mark.skipif(len(BACKENDS) < 2, reason="torch < 2.9 has no per-backend fp32_precision")
def test_a_backend_without_a_per_backend_setting_is_left_out(monkeypatch):
    """On torch < 2.9 ``torch.backends.cuda.matmul`` exists without ``fp32_precision``: such a
    backend is not one whose setting can be raised (setting the attribute would do nothing),
    and the others are still raised."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", object())
    assert autocast._matmul_backends() == [torch.backends.mkldnn.matmul]


def test_without_per_backend_settings_the_legacy_precision_is_highest_inside_and_restored(monkeypatch):
    """Without ``fp32_precision`` attributes (torch < 2.9, which ``pyproject.toml`` supports) the
    one legacy setting is ``"highest"`` (full float32) inside and the caller's again on exit,
    also when the block raises. The legacy setting is simulated: reading the real one raises
    once the per-backend ones were set in the same process, as other tests do."""
    setting = ["medium"]
    monkeypatch.setattr(autocast, "_matmul_backends", lambda: [])
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: setting[0])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: setting.__setitem__(0, value))
    with pytest.raises(KeyError), ieee_float32_matmuls():
        assert setting == ["highest"]
        raise KeyError
    assert setting == ["medium"]


def test_autocast_disabled_does_nothing_on_a_device_without_autocast():
    """``torch.autocast`` refuses the ``meta`` device, where layers infer shapes: there the
    context leaves the computation as it is (meta tensors keep their dtype)."""
    with pytest.raises(RuntimeError):
        torch.autocast("meta", enabled=False)
    with autocast_disabled("meta"):
        x = torch.zeros(3, 3, device="meta")
        assert (x @ x).dtype == torch.float32


def test_a_compiled_function_traces_the_full_float32_context_in_one_graph():
    """Under ``torch.compile`` the context does nothing (a traced function cannot switch global
    settings, and Dynamo cannot trace the settings' getters): a function using it compiles
    into one graph (``fullgraph=True``) and computes what it does in eager mode."""
    def square(x):
        with ieee_float32_matmuls():
            return x @ x
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.compile(square, fullgraph=True, backend="eager")(x), x @ x)
