"""benchmarks/peers.py: exact operator norms of 1-Lipschitz convolutions as applied."""

import pytest
import torch
from torch import nn

from lipnet.bounds.reference import conv2d_operator_matrix, exact_conv2d_spectral_norm
from lipnet.nn import GramConv2d


@pytest.mark.parametrize("mode, stride", [("zeros", 1), ("zeros", 2), ("reflect", 1), ("replicate", 2), ("circular", 1)])
def test_applied_matrix_is_the_convolution_operator(peers_module, mode, stride):
    """The measured map is exactly the convolution (impulse responses in float64), the bias
    taken out: the benchmark measures the operator the layer applies, not something else."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, stride=stride, padding=1, padding_mode=mode).double()
    nn.init.uniform_(conv.bias, 1.0, 2.0)
    measured = peers_module.applied_matrix(conv, 3, 5)
    expected = conv2d_operator_matrix(conv.weight, 5, stride=stride, padding=1, padding_mode=mode)
    torch.testing.assert_close(measured, expected, rtol=0, atol=1e-12)


def test_applied_norm_of_a_gram_layer_is_its_exact_norm_and_at_most_one(peers_module):
    torch.manual_seed(1)
    layer = GramConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    norm = peers_module.applied_norm(layer, 3, 6)
    with torch.no_grad():
        exact = exact_conv2d_spectral_norm(layer.normalized_weight(6).double(), 6, padding=1, padding_mode="reflect")
    assert norm == pytest.approx(exact, rel=1e-6)
    assert 0.3 < norm <= 1 + 1e-6
    assert layer.training  # the measurement restores the mode


def test_adversarial_steps_raise_an_unconstrained_norm(peers_module):
    """The ascent does push the applied norm up: on a plain convolution (no constraint) it grows
    with every step, so a constrained layer staying at or below 1 is the constraint's doing."""
    torch.manual_seed(2)
    norms = peers_module.adversarial_norms(nn.Conv2d(2, 2, 3, padding=1), 2, 4, steps=5, lr=1e-2)
    assert len(norms) == 6
    assert all(b > a for a, b in zip(norms, norms[1:]))


def test_main_reports_lipnet_within_one_and_power_iteration_above(peers_module, capsys):
    rows = peers_module.main(["--layers", "lipnet,spectral_norm", "--configs", "zeros:1,reflect:1",
                              "--channels", "2", "--n", "4", "--steps", "2"])
    by_key = {(row["layer"], row["padding_mode"]): row for row in rows}
    assert set(by_key) == {(layer, mode) for layer in ("lipnet", "spectral_norm") for mode in ("zeros", "reflect")}
    for mode in ("zeros", "reflect"):
        assert by_key["lipnet", mode]["worst"] <= 1 + 1e-6
        assert peers_module.verdict(by_key["lipnet", mode]) == "<= 1"
        # spectral_norm bounds the reshaped kernel, not the convolution: above 1 here.
        assert by_key["spectral_norm", mode]["worst"] > 1 + peers_module.TOLERANCE
        assert peers_module.verdict(by_key["spectral_norm", mode]).startswith("exceeds 1 by")
    out = capsys.readouterr().out
    assert "| lipnet | reflect | 1 |" in out


def test_a_refused_configuration_is_reported_not_raised(peers_module, monkeypatch):
    def refuse(c, stride, mode):
        raise ValueError("padding_mode 'reflect' is not supported\nsecond line")

    monkeypatch.setitem(peers_module.FACTORIES, "spectral_norm", refuse)
    row = peers_module.measure("spectral_norm", "reflect:1", 2, 4, steps=1, lr=1e-2, seed=0)
    assert peers_module.verdict(row) == "refused: ValueError: padding_mode 'reflect' is not supported"
    assert "| spectral_norm | reflect | 1 | | | refused" in peers_module.format_table([row])


def test_unknown_layer_is_an_error(peers_module):
    with pytest.raises(SystemExit):
        peers_module.main(["--layers", "lipnet,nope", "--steps", "0"])
