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


def test_cuda_timing_waits_for_the_warmup_and_for_each_timed_call(bounds_module, monkeypatch):
    """On CUDA the first timed start event must not be queued behind the warm-up's work (it would
    be stamped when the GPU reached it, after the host had launched much of the timed call)."""
    import torch

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.append("record")

        def elapsed_time(self, end):
            return 1.5

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: log.append("sync"))
    assert bounds_module.timed(lambda: log.append("call"), torch.device("cuda"), repeat=2, warmup=2) == 1.5
    assert log == ["call", "call", "sync"] + ["record", "call", "record", "sync"] * 2


def test_compiled_layer_steps_keep_static_shapes(bounds_module, monkeypatch):
    """Each shape's compiled nn.Conv2d and GramConv2d steps are static-shape compilations, as a
    recipe's: without dynamic=False, the second shape's recompile marks the nn.Conv2d input's
    sizes dynamic (automatic dynamic shapes) while GramConv2d specializes them."""
    import torch

    real_compile, symbolic = torch.compile, []

    def backend(gm, example_inputs):
        symbolic.append(any(isinstance(a, torch.SymInt) for a in example_inputs)
                        or any(isinstance(node.meta.get("example_value"), torch.SymInt)
                               for node in gm.graph.nodes if node.op == "placeholder"))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kwargs: real_compile(model, backend=backend, **kwargs))
    torch._dynamo.reset()
    try:
        for c, n in ((4, 4), (2, 6)):
            row = bounds_module.layer_times(c, n, 2, torch.device("cpu"), repeat=1, compile_=True)
            assert row["gram_compiled_ratio"] > 0
    finally:
        torch._dynamo.reset()
    assert symbolic and not any(symbolic)


def test_a_failure_keeps_the_other_figures(bounds_module, monkeypatch, tmp_path, capsys):
    """One unattended GPU run: a shape or network that fails is reported, the rest still runs,
    and every figure measured is in --json (written as each part ends)."""
    import json

    import pytest
    from torch import nn

    def layer_times(c, n, *args, **kwargs):
        if c == 2:
            raise RuntimeError("compilation failed")
        return dict(c=c, n=n, bound_fwd_ms=1.0, bound_fwd_bwd_ms=2.0, conv2d_step_ms=1.0, conv2d_ratio=1.0,
                    gram_step_ms=3.0, gram_ratio=3.0)

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken network")

    monkeypatch.setattr(bounds_module, "layer_times", layer_times)
    monkeypatch.setattr(bounds_module, "reference_convnet", lambda gram: nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 10), *([Broken()] if gram else [])))
    path = tmp_path / "out.json"
    results = bounds_module.main(["--device", "cpu", "--sections", "layer,network", "--networks", "convnet",
                                  "--shapes", "4x4,2x4,8x2", "--repeat", "1", "--net-batch", "2", "--json", str(path)])
    assert [row["c"] for row in results["layer"]] == [4, 8]
    network = results["network"]["convnet"]
    assert network["plain_eager_img_per_s"] > 0 and "gram_eager_img_per_s" not in network
    assert set(results["errors"]) == {"layer/2x4", "network/convnet/gram_eager_img_per_s"}
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert not path.with_name(path.name + ".tmp").exists()  # written whole, then renamed
    out = capsys.readouterr().out
    assert "SECTION layer/2x4 FAILED: RuntimeError: compilation failed" in out
    assert "FAILED gram_eager_img_per_s: RuntimeError: broken network" in out
    with pytest.raises(SystemExit, match="resnet"):  # a misspelt network stops the run before it starts
        bounds_module.main(["--device", "cpu", "--sections", "layer,network", "--networks", "convnet,resnet"])
    with pytest.raises(SystemExit, match="layers"):  # and a misspelt section (it would run nothing)
        bounds_module.main(["--device", "cpu", "--sections", "layers,network"])


def test_launch_bound_choices_patch_one_function_object(bounds_module):
    """The compiled gram_fewer_ops step sees the same patched function at every step (a new
    lambda per step could fail an identity guard and recompile each time), and the library's
    own is restored after each."""
    import lipnet.bounds.gram as gram_module

    original, seen = gram_module.launches_are_free, []
    step = bounds_module.with_launch_bound_choices(lambda: seen.append(gram_module.launches_are_free))
    step()
    step()
    assert seen[0] is seen[1] is not original and not seen[0](None)
    assert gram_module.launches_are_free is original
