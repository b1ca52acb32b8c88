"""CI slice of the export round-trip fuzz (tests/fuzz_export.py)."""

import pytest
import torch
from torch import nn

import fuzz_export
from lipnet.export import exporter
from lipnet.nn import GramLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_networks_export_bitwise_with_their_bound_and_isolated_from_the_source():
    outcomes = [fuzz_export.run_case(seed)[0] for seed in range(20)]
    assert outcomes.count("passed") >= 15, outcomes


def test_an_exported_model_runs_bitwise_in_a_fresh_process_without_lipnet():
    assert fuzz_export.run_case(9, deploy=True)[0] == "passed"  # a float32 lipnet.models network


def test_the_fuzz_reports_a_baked_weight_perturbed_by_1e_6(monkeypatch):
    plain_layer = exporter._plain_layer

    def perturbed(layer, input_size):
        plain = plain_layer(layer, input_size)
        with torch.no_grad():
            plain.weight.view(-1)[0] += 1e-6
        return plain

    monkeypatch.setattr(exporter, "_plain_layer", perturbed)
    monkeypatch.setattr(exporter, "_check_same", lambda *args: None)  # the exporter's own check would raise
    model = nn.Sequential(GramLinear(6, 4)).double().eval()
    with pytest.raises(fuzz_export.Violation, match="outputs: exported != model"):
        fuzz_export.check_case(model, (6,), seed=0, deploy=False)


def test_a_module_export_refuses_raises_a_value_error_saying_why():
    # A plain nn.Linear before another module has no bound (as the last module of a Sequential it has one).
    outcome = fuzz_export.check_case(nn.Sequential(nn.Linear(3, 2), nn.ReLU()).eval(), (3,), seed=0, deploy=False)
    assert outcome.startswith("refused: cannot certify the exported model"), outcome


def test_every_module_type_lipnet_certify_accepts_traces_to_operators_the_runtime_allows():
    """A certifiable network with a float32-finite weight is never refused (PReLU, Mish, 1-D and 3-D
    pooling, Dropout2d in eval ... once were: their ATen operators were outside the allowlist)."""
    outcomes = [fuzz_export.run_case(seed)[0] for seed in range(20, 36)]
    assert [o for o in outcomes if o != "passed"] == [], outcomes


def test_a_network_starting_with_an_in_place_module_exports():
    model = nn.Sequential(nn.SiLU(inplace=True), nn.ReLU()).eval()
    assert fuzz_export.check_case(model, (4,), seed=0, deploy=False) == "passed"
