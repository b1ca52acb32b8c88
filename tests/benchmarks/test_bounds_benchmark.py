"""benchmarks/bounds.py runs every section end to end (tiny sizes, CPU) and reports sane numbers."""


def test_every_section_runs_and_reports(bounds_module, tmp_path, capsys):
    results = bounds_module.main(["--device", "cpu", "--shapes", "8x4", "--repeat", "1", "--batch", "2",
                                  "--net-batch", "2", "--json", str(tmp_path / "out.json")])
    (accuracy,) = results["accuracy"]
    assert abs(accuracy["gram_gap"]) < 1e-4 and accuracy["ratio_to_lower"] >= 1 - 1e-5
    (gaps,) = results["gaps"]
    assert set(bounds_module.GAP_KINDS) <= set(gaps)
    assert all(gaps[kind] > -1e-5 for kind in bounds_module.GAP_KINDS)  # bounds: never below (float32 rounding)
    # On the CPU also screening alone (GPU, compiled), never tighter than the default beyond its tolerance.
    assert all(gaps[kind] <= gaps[f"{kind}/screened"] + 1e-4 for kind in bounds_module.GAP_KINDS)
    (ops,) = results["ops"]
    assert 0 < ops["forward"] < ops["forward_backward"]
    (layer,) = results["layer"]
    assert layer["gram_ratio"] > 0
    networks = results["network"]
    assert set(networks) == {"convnet", "liresnet-s"}
    for key in ("plain_eager_img_per_s", "gram_eager_img_per_s", "gram_per_layer_eager_img_per_s",
                "eager_gram_over_plain", "eager_gram_per_layer_over_plain"):
        assert networks["liresnet-s"][key] > 0
    assert (tmp_path / "out.json").exists()
    out = capsys.readouterr().out
    assert "gram gap of the training bound by kernel" in out and "screening alone" in out and "liresnet-s" in out


def test_kernels_of_each_kind(bounds_module):
    import torch

    for kind in bounds_module.GAP_KINDS:
        weight = bounds_module.kernel_of_kind(kind, 6, "cpu")
        assert weight.shape == (6, 6, 3, 3)
    near_identity = bounds_module.kernel_of_kind("I+0.01", 6, "cpu")
    assert torch.allclose(near_identity[:, :, 1, 1], torch.eye(6), atol=0.05)


def test_with_screen_iter_copies_the_network(bounds_module):
    import torch

    from lipnet.models import build_model
    from lipnet.nn import GramConv2d

    net = build_model("liresnet-xs", in_channels=3, num_classes=10, input_size=16)
    screened = bounds_module.with_screen_iter(net, 7)
    convs = [m for m in screened.modules() if isinstance(m, GramConv2d)]
    assert convs and all(m.screen_iter == 7 for m in convs)
    assert all(m.screen_iter == 5 for m in net.modules() if isinstance(m, GramConv2d))
    x = torch.rand(2, 3, 16, 16)
    screened.load_state_dict(net.state_dict())
    # The same network: its bounds differ by the screening (at initialization the trace form's smoothing, ~2e-4).
    torch.testing.assert_close(screened.eval()(x), net.eval()(x), rtol=1e-3, atol=1e-4)
