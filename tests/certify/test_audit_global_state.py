"""Red team: certification under process-wide or thread-local torch state the caller set first.

Each test sets one setting, certifies, and checks the proven property: the result is the one
computed without the setting (or at most the true value), the setting is the caller's again
afterwards, or the call is refused with a message that says why.
"""

import contextlib
import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipnet.bounds.rounding import flushes_denormals
from lipnet.certify import certified_accuracy, certified_radius, lipschitz_bound
from lipnet.nn import GramLinear


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), GramLinear(4, 3)).eval()


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 2, 2, generator=gen), torch.randint(0, 3, (12,), generator=gen)


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def test_denormal_flushing_is_asked_of_the_cpu_whatever_the_default_device(flushed_denormals, net, data,
                                                                           default_device):
    """flushes_denormals() created its probe tensor on the default device: under "meta" every certify
    call raised "Tensor.item() cannot be called on meta tensors", and under "cuda" the GPU, which does
    not flush, would have answered "no" while the CPU flushed (the false certificates of flushing back)."""
    with default_device("meta"):
        assert flushes_denormals()
        result = certified_accuracy(net, data, eps=[0.1], progress=False)
        bound = lipschitz_bound(net, (1, 2, 2))
        radius = certified_radius(torch.tensor([[1.0, 0.0]], device="cpu"), torch.tensor([0], device="cpu"), 1.0)
        assert torch.get_default_device().type == "meta"  # the caller's setting, still
        assert torch.set_flush_denormal(True) and flushes_denormals()  # and flushing is on again
    torch.set_flush_denormal(False)
    plain = certified_accuracy(net, data, eps=[0.1], progress=False)
    assert torch.equal(result.radii, plain.radii) and bound == plain.lipschitz
    assert radius.device.type == "cpu" and float(radius) == float(certified_radius(
        torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 1.0))


def test_a_model_without_parameters_is_certified_on_its_input_not_on_the_default_dtype():
    """ExactLogits cast the inputs of a parameterless model to torch's default dtype: under
    set_default_dtype(torch.float16), 0.5003 and 0.5002 (float32) became 2^-1 + 2^-11 and 2^-1, and the
    identity "classifier" was certified at 3.45e-4 where its true radius is 7.07e-5."""
    x = torch.tensor([[0.5003, 0.5002]], dtype=torch.float32)
    y = torch.tensor([0])
    a, b = (Fraction(float(v)) for v in x[0])
    true_radius = (a - b) / Fraction(math.sqrt(2))  # sqrt(2) rounded down only lowers 1/sqrt(2): an upper bound
    with default_dtype(torch.float16):
        radius = float(certified_accuracy(nn.Flatten(), (x, y), eps=[0.0], progress=False).radii[0])
    assert 0 < radius and Fraction(radius) <= true_radius * (1 + Fraction(1, 10**12))
    with default_dtype(torch.float64):  # float32 inputs, seen as they are: the same radius
        assert float(certified_accuracy(nn.Flatten(), (x, y), eps=[0.0], progress=False).radii[0]) == radius


def test_a_parameterless_model_refuses_a_later_batch_of_another_dtype():
    """Its copy was made for the first batch's dtype (nearest upsampling's index arithmetic follows it);
    a later float64 batch would have been rounded to float32."""
    batches = [(torch.rand(2, 3), torch.tensor([0, 1])), (torch.rand(2, 3, dtype=torch.float64), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="without floating parameters"):
        certified_accuracy(nn.Flatten(), batches, eps=[0.0], progress=False)


@contextlib.contextmanager
def _matmul_precision(value):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


AMBIENT = {
    "autocast-bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "inference-mode": torch.inference_mode,
    "default-float64": lambda: default_dtype(torch.float64),
    "default-bfloat16": lambda: default_dtype(torch.bfloat16),
    "matmul-medium": lambda: _matmul_precision("medium"),
    "deterministic": _deterministic,
    "warnings-are-errors": _warnings_are_errors,
}


@pytest.mark.parametrize("setting", sorted(AMBIENT))
def test_ambient_settings_leave_the_certificates_and_the_settings_alone(setting, net, data):
    """Harmless today (the float64 pass is not autocast-eligible, the bounds leave autocast and lower
    precision), kept because each could plausibly break: the radii, bound and the caller's settings
    and random state are those of a plain call."""
    plain = certified_accuracy(net, data, eps=[0.1], progress=False)
    matmul, dtype = torch.get_float32_matmul_precision(), torch.get_default_dtype()
    with AMBIENT[setting]():
        state = torch.get_rng_state()
        result = certified_accuracy(net, data, eps=[0.1], progress=False)
        bound = lipschitz_bound(net, (1, 2, 2))
        assert torch.equal(torch.get_rng_state(), state)
        autocast = torch.is_autocast_enabled("cpu")
    assert autocast == (setting == "autocast-bf16")
    assert torch.equal(result.radii, plain.radii) and result.lipschitz == plain.lipschitz == bound
    assert (torch.get_float32_matmul_precision(), torch.get_default_dtype()) == (matmul, dtype)


def test_audit_gives_the_callers_random_state_back(net, data):
    """AutoAttack reseeds torch's global generator (torch.manual_seed(seed) at each attack): after an
    audit the caller's next random numbers were those of seed 0."""
    pytest.importorskip("pyautoattack")
    from lipnet.certify import audit

    x, y = data
    torch.manual_seed(123)
    torch.rand(3)
    state = torch.get_rng_state()
    audit(net, x, y, 0.05, version="apgd", attack="correct")
    assert torch.equal(torch.get_rng_state(), state)


def test_torch_func_transforms_are_refused_with_a_message(net, data):
    """Under torch.func.vmap, certified_radius and certified_accuracy failed with vmap's own "data-dependent
    control flow" error, which does not say that certification runs outside transforms."""
    x, y = data
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.vmap(lambda row: certified_radius(row[None], torch.tensor([0]), 1.0))(torch.rand(3, 2))
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.vmap(lambda xb: certified_accuracy(net, (xb, y[:2]), progress=False).radii)(x[:6].reshape(3, 2, 1, 2, 2))
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.grad(lambda z: certified_radius(z[None], torch.tensor([0]), 1.0).sum())(torch.tensor([1.0, 0.0]))
    # Under grad the model's float64 copy, made before any input is seen, failed with torch's "mutating
    # directly with .data inside functorch transform" (found by helper 56's docs audit).
    with pytest.raises(TypeError, match="torch.func transform"):
        torch.func.grad(lambda xb: torch.tensor(certified_accuracy(net, (xb, y[:1]), progress=False).clean_accuracy)
                        )(x[:1].clone())


def test_audit_attacks_under_the_callers_inference_mode(net, data):
    """AutoAttack takes gradients: under torch.inference_mode() the audit failed with "element 0 of
    tensors does not require grad" (and inputs made there are inference tensors)."""
    pytest.importorskip("pyautoattack")
    from lipnet.certify import audit

    x, y = data
    plain = audit(net, x, y, 2.0, version="apgd")
    with torch.inference_mode():
        result = audit(net, x.clone(), y, 2.0, version="apgd")
    assert result.n_broken == plain.n_broken > 0 and result.sound


def test_a_soundness_warning_points_at_the_callers_line(trained_net, blobs):
    """_report warns with a stacklevel that must name the caller of audit, not lipnet's own frames
    (audit now runs its body in _audit, one frame deeper)."""
    pytest.importorskip("pyautoattack")
    from lipnet.certify import SoundnessWarning, audit, register_lipschitz_bound
    from lipnet.certify.lipschitz import _REGISTRY

    class Amplify(nn.Module):
        def forward(self, x):
            return 20 * x

    register_lipschitz_bound(Amplify, lambda module, shape: 1.0)  # false: it is 20-Lipschitz
    try:
        broken = nn.Sequential(*list(trained_net)[:-1], Amplify(), trained_net[-1]).eval()
        x, y = blobs(32, seed=12)
        with pytest.warns(SoundnessWarning, match="broke") as record:
            audit(broken, x, y, 1.0, version="apgd", on_failure="warn")
    finally:
        del _REGISTRY[Amplify]
    assert [w.filename for w in record if issubclass(w.category, SoundnessWarning)] == [__file__]
