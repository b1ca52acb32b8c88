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


def test_a_failing_variant_keeps_the_others(profile_module, monkeypatch, capsys):
    """One unattended GPU run: a variant that fails (e.g. the CUDA-graph capture) is reported and
    the other variants' rows and kernel tables are still printed."""
    real = profile_module.step_function

    def step_function(model, batch, device, compile_, graphs=False):
        def broken():
            raise RuntimeError("capture failed")
        return broken if model is failing[0] else real(model, batch, device, compile_, graphs)

    real_variants = profile_module.variants
    failing = []

    def variants(model_name, device):
        found = real_variants(model_name, device)
        failing.append(found["gram per layer"])
        return found

    monkeypatch.setattr(profile_module, "step_function", step_function)
    monkeypatch.setattr(profile_module, "variants", variants)
    rows = profile_module.main(["--model", "liresnet-xs", "--batch", "2", "--repeat", "1", "--device", "cpu", "--top", "2"])
    assert rows["gram per layer"] == {"error": "RuntimeError: capture failed"}
    assert rows["plain"]["kernels"] > 0 and rows["gram stacked"]["kernels"] > 0
    out = capsys.readouterr().out
    assert "gram per layer FAILED: RuntimeError: capture failed" in out
    assert "## plain: kernels by time per step" in out
