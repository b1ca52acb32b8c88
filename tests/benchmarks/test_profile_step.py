"""benchmarks/profile_step.py: one step of each variant is timed and its kernels counted (CPU here)."""


def test_runs_and_reports_each_variant(profile_module, capsys):
    rows = profile_module.main(["--model", "liresnet-xs", "--batch", "4", "--repeat", "1", "--device", "cpu",
                                "--top", "3"])
    assert set(rows) == {"gram stacked", "gram per layer", "plain"}
    for row in rows.values():
        assert row["wall_ms"] > 0 and row["kernel_ms"] > 0 and row["kernels"] > 0
    # The plain network runs no bound: fewer operations than either Gram variant; stacking
    # the equal residual bounds leaves fewer than bounding each layer alone.
    assert rows["plain"]["kernels"] < rows["gram stacked"]["kernels"] < rows["gram per layer"]["kernels"]
    assert "kernels by time per step" in capsys.readouterr().out
