"""CI slice of the export round-trip fuzz (tests/fuzz_export.py)."""

import pytest
import torch
from torch import nn

import fuzz_export
import lipnet
from lipnet.export import exporter
from lipnet.nn import GramLinear


@pytest.fixture(autouse=True)
def one_thread():
    """torch.export's tracing of small networks is several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_networks_export_bitwise_with_their_bound_and_isolated_from_the_source():
    outcomes = [fuzz_export.run_case(seed)[0] for seed in range(30)]
    assert outcomes.count("passed") >= 10, outcomes


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


def test_a_module_outside_the_runtime_allowlist_is_refused_with_a_value_error():
    outcome = fuzz_export.check_case(nn.Sequential(nn.PReLU(), GramLinear(3, 2)).eval(), (3,), seed=0, deploy=False)
    assert outcome.startswith("refused: operator aten.prelu")


def test_a_network_starting_with_an_in_place_module_exports():
    model = nn.Sequential(nn.SiLU(inplace=True), nn.ReLU()).eval()
    assert fuzz_export.check_case(model, (4,), seed=0, deploy=False) == "passed"
