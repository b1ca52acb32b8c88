"""benchmarks/activations.py: MaxMin against autograd max/min and ReLU (CPU here)."""


def test_runs_and_counts_fewer_operations_than_the_autograd_reference(activations_module, capsys):
    rows = activations_module.main(["--shapes", "2x8x4x4", "--repeat", "1", "--device", "cpu"])
    assert {name for _, name in rows} == {"MaxMin", "max/min autograd", "relu"}
    ops = {name: row["ops"] for (_, name), row in rows.items()}
    assert ops["MaxMin"] < ops["max/min autograd"] / 2
    assert rows[("2x8x4x4", "max/min autograd")]["ratio"] == 1.0
    assert "/ autograd" in capsys.readouterr().out
