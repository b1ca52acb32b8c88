"""lipnet.export: plain-PyTorch round trip, stored certified bound, loading without lipnet."""

import json
import math
import os
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from lipnet import export
from lipnet.bounds.reference import exact_conv2d_spectral_norm, exact_conv_transpose2d_spectral_norm
from lipnet.certify import certified_radius, lipschitz_bound
from lipnet.export import ExportedModel, load, runtime
from lipnet.nn import (
    ConvexResidual,
    GlobalL2NormPool2d,
    GramConv2d,
    GramConvTranspose2d,
    GramLinear,
    GramResidualConv2d,
    InputNormalization,
    L2NormPool2d,
    MaxMin,
)

SHAPE = (3, 8, 8)


def every_layer_net():
    """One of each lipnet layer, strides, circular padding, a residual and a convex residual."""
    return nn.Sequential(
        InputNormalization([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]),
        GramConv2d(3, 8, 3, padding=1),
        MaxMin(),
        GramConv2d(8, 8, 3, padding=1, padding_mode="circular"),
        L2NormPool2d(2),
        ConvexResidual(nn.Sequential(GramConv2d(8, 8, 3, padding=1), MaxMin()), alpha=0.3),
        GramResidualConv2d(8, 3),
        GramConv2d(8, 16, 3, stride=2, padding=1),
        MaxMin(),
        GlobalL2NormPool2d(),
        nn.Flatten(),
        GramLinear(16, 10),
    )


def plain_net():
    return nn.Sequential(GramConv2d(3, 4, 3, padding=1), MaxMin(), GramConv2d(4, 4, 3, stride=2, padding=1),
                         MaxMin(), nn.Flatten(), GramLinear(4 * 4 * 4, 10))


def train_steps(net, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, *SHAPE, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def max_diff(a, b):
    return float((a - b).detach().abs().max())


def test_round_trip_matches_the_model_and_stores_its_bound():
    net = train_steps(every_layer_net())
    exported = export(net, SHAPE)
    assert isinstance(exported, ExportedModel) and not isinstance(exported, type(net))
    x = torch.randn(5, *SHAPE)
    assert max_diff(exported(x), net.eval()(x)) <= 1e-6
    assert exported.lipschitz_bound == lipschitz_bound(net, SHAPE)
    assert 1 <= exported.lipschitz_bound <= 5 * (1 + 1e-4)  # input normalization: 1 / min std = 5
    # Plain torch layers with the normalized weights baked in, frozen, in eval mode.
    assert all(type(m).__module__.startswith("torch") for m in exported.network.modules())
    convs = [m for m in exported.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 5 and sum(type(m) is nn.Linear for m in exported.modules()) == 1
    torch.testing.assert_close(convs[0].weight, net[1].normalized_weight((8, 8)), rtol=0, atol=0)
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())


class Residual(nn.Module):
    """A user-written residual block, bounded through lipnet.convert's traced bound."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x) + x)


def test_converted_models_with_custom_containers_export_with_their_bound():
    from lipnet import convert

    model, report = convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(), nn.Flatten(),
                                          nn.Linear(4 * 64, 10)), input_shape=SHAPE)
    exported = export(model, SHAPE)
    assert exported.lipschitz_bound == report.lipschitz_bound and 2 <= exported.lipschitz_bound <= 2 * (1 + 1e-4)
    x = torch.randn(4, *SHAPE)
    assert max_diff(exported(x), model.eval()(x)) <= 1e-6


def test_stored_bound_is_sound_for_the_exported_weights():
    """Product of the exact (dense SVD) norms of the exported layers <= the stored bound."""
    net = train_steps(plain_net())
    exported = export(net, SHAPE)
    convs = [m for m in exported.modules() if type(m) is nn.Conv2d]
    linear = next(m for m in exported.modules() if type(m) is nn.Linear)
    exact = exact_conv2d_spectral_norm(convs[0].weight, (8, 8), padding=1)
    exact *= exact_conv2d_spectral_norm(convs[1].weight, (8, 8), stride=2, padding=1)
    exact *= float(torch.linalg.matrix_norm(linear.weight.double(), ord=2))
    assert exact <= exported.lipschitz_bound
    assert exported.lipschitz_bound <= 1 + 1e-4


class EncoderDecoder(nn.Module):
    """Down and up again, the decoder told the encoder's input size (``output_size``)."""

    def __init__(self):
        super().__init__()
        self.down = GramConv2d(3, 4, 3, stride=2, padding=1)
        self.act = MaxMin()
        self.up = GramConvTranspose2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.act(self.down(x)), output_size=x.shape[-2:])


def test_transposed_convolutions_export_as_nn_conv_transpose2d_with_their_output_padding():
    net = train_steps(nn.Sequential(GramConv2d(3, 4, 3, padding=1), MaxMin(),
                                    GramConvTranspose2d(4, 2, 4, stride=2, padding=1), nn.Flatten(),
                                    GramLinear(2 * 16 * 16, 10)))
    exported = export(net, SHAPE)
    x = torch.randn(4, *SHAPE)
    assert max_diff(exported(x), net.eval()(x)) <= 1e-6
    assert exported.lipschitz_bound == lipschitz_bound(net, SHAPE) <= 1 + 1e-4
    (up,) = [m for m in exported.modules() if type(m) is nn.ConvTranspose2d]
    exact = exact_conv_transpose2d_spectral_norm(up.weight, 8, stride=2, padding=1)
    assert exact <= 1 + 1e-6
    # the decoder of an encoder-decoder, applied with output_size: its output padding is baked in
    model = EncoderDecoder()
    exported = export(model, SHAPE, certify=False)
    assert max_diff(exported(x), model.eval()(x)) == 0 and exported(x).shape == x.shape
    (up,) = [m for m in exported.modules() if type(m) is nn.ConvTranspose2d]
    assert up.output_padding == (1, 1)
    torch.testing.assert_close(up.weight, model.up.normalized_weight(), rtol=0, atol=0)
    assert exact_conv_transpose2d_spectral_norm(up.weight, 4, stride=2, padding=1, output_padding=1) <= 1 + 1e-6


def test_a_transposed_convolution_applied_at_two_output_sizes_cannot_be_baked():
    up = GramConvTranspose2d(3, 3, 3, stride=2, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = up

        def forward(self, x):
            return self.up(x, output_size=(15, 15)) + self.up(x, output_size=(16, 16))[..., 1:, 1:]

    with pytest.raises(ValueError, match="outputs of spatial sizes"):
        export(Twice(), SHAPE, certify=False)


def test_batch_size_is_free_but_the_input_shape_is_enforced():
    exported = export(plain_net(), SHAPE)
    assert exported(torch.randn(1, *SHAPE)).shape == (1, 10)
    assert exported(torch.randn(7, *SHAPE)).shape == (7, 10)
    with pytest.raises(ValueError, match=r"inputs of shape \(batch, 3, 8, 8\)"):
        exported(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="inputs of shape"):
        exported(torch.randn(3, 8, 8))


def test_export_before_loading_weights_and_in_train_mode_is_correct():
    """deel-torchlip #17: an export right after load_state_dict (no forward pass) lost accuracy."""
    trained = train_steps(plain_net()).eval()
    fresh = plain_net()
    fresh.eval()
    fresh(torch.randn(2, *SHAPE))  # fills the eval caches with the random weights' normalization
    fresh.train()
    fresh.load_state_dict(trained.state_dict())
    exported = export(fresh, SHAPE)
    x = torch.randn(6, *SHAPE)
    assert max_diff(exported(x), trained(x)) <= 1e-6
    assert fresh.training and all(m.training for m in fresh.modules())  # mode untouched
    assert exported.lipschitz_bound == lipschitz_bound(trained, SHAPE)


def test_export_is_a_snapshot_independent_of_later_training():
    net = plain_net()
    exported = export(net, SHAPE)
    x = torch.randn(4, *SHAPE)
    before = exported(x)
    train_steps(net)
    assert torch.equal(exported(x), before)
    assert max_diff(export(net, SHAPE)(x), net.eval()(x)) <= 1e-6


def test_export_leaves_the_model_untouched():
    net = nn.Sequential(GramConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), MaxMin(), nn.Flatten(),
                        GramLinear(4 * 64, 10)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    exported = export(net, SHAPE, certify=False)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(m.training for m in net.modules())
    x = torch.randn(3, *SHAPE)
    assert max_diff(exported(x), net.eval()(x)) <= 1e-6  # the eval-mode function


def test_uncertifiable_models_need_certify_false():
    # BatchNorm without running statistics normalizes by its batch even in eval mode: no bound.
    net = nn.Sequential(GramConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                        GramLinear(4 * 64, 10))
    with pytest.raises(ValueError, match="certify=False"):
        export(net, SHAPE)
    exported = export(net, SHAPE, certify=False)
    assert exported.lipschitz_bound is None
    with pytest.raises(ValueError, match="no Lipschitz bound"):
        exported.certified_radius(torch.randn(2, 10))


def test_a_model_that_refuses_one_example_exports_without_the_batch_size_1_check():
    """BatchNorm1d with batch statistics over flat features refuses a batch of one ("Expected more than 1
    value per channel"): the export's check at batch size 1 has no output to compare and is skipped; the
    checks at 2 and 3 still run."""
    torch.manual_seed(0)
    net = nn.Sequential(GramLinear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    exported = export(net, (4,), certify=False)
    x = torch.randn(5, 4)
    assert max_diff(exported(x), net.eval()(x)) <= 1e-6


def test_certified_radius_matches_lipnet_certify():
    net = train_steps(plain_net())
    exported = export(net, SHAPE)
    logits = exported(torch.randn(32, *SHAPE))
    expected = certified_radius(logits, logits.argmax(1), exported.lipschitz_bound)
    assert torch.equal(exported.certified_radius(logits), expected)
    assert exported.certified_radius(torch.tensor([[1.0, 1.0, 0.0]])).item() == 0.0  # a tie
    integers = torch.tensor([[5, 1, 0], [2, 2, 1]])
    assert torch.equal(exported.certified_radius(integers),
                       certified_radius(integers, integers.argmax(1), exported.lipschitz_bound))
    # Beyond 2^53 integers round in float64; beyond the largest float the margin overflows: both
    # as lipnet.certify takes them (a radius of 181 for the exact 91; 1.8e308, the largest float, for the exact
    # ~2.4e308 / L; ~1.4e308 / L for +-1e308). Two classes: with a third logit of 0 the margin is the top logit
    # alone, which does not overflow, and the halved computation was never run.
    for extreme in (torch.tensor([[2**60 + 256, 2**60 + 127, 0]]),
                    torch.tensor([[1.7e308, -1.7e308]], dtype=torch.float64),
                    torch.tensor([[1e308, -1e308]], dtype=torch.float64)):
        expected = certified_radius(extreme, extreme.argmax(1), exported.lipschitz_bound)
        assert torch.equal(exported.certified_radius(extreme), expected)
        margin = Fraction(int(extreme[0, 0])) - Fraction(int(extreme[0, 1]))  # exact
        assert Fraction(float(expected[0])) <= margin / Fraction(2**0.5 * exported.lipschitz_bound) * Fraction(1 + 1e-15)


def test_float64_models_export_in_float64():
    net = train_steps(plain_net()).double()
    exported = export(net, SHAPE)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    assert exported(x).dtype == torch.float64
    assert max_diff(exported(x), net.eval()(x)) <= 1e-12


def test_bad_inputs_get_clear_errors():
    net = plain_net()
    for shape in [(), (3, 0, 8), "3x8x8", (3.0, 8, 8), None]:
        with pytest.raises(ValueError, match="input_shape"):
            export(net, shape)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(batch, 1, 8, 8\)"):
        export(net, (1, 8, 8))
    exported = export(net, SHAPE)
    with pytest.raises(RuntimeError, match="frozen"):
        exported.train()
    exported.eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_gram_layer_with_a_non_finite_weight_is_named_not_blamed_on_the_input_shape(value):
    net = plain_net()
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="cannot export") as raised:
        export(net, SHAPE)
    message = str(raised.value)
    assert "'2.weight'" in message and ("NaN" if value != value else "inf") in message
    assert "does not accept inputs" not in message


def test_a_convolution_applied_at_two_sizes_cannot_be_baked():
    conv = GramConv2d(3, 3, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x)[..., ::2, ::2])

    with pytest.raises(ValueError, match="spatial sizes"):
        export(Twice(), SHAPE, certify=False)


def test_archives_are_checked_and_never_executed():
    archive = export(plain_net(), SHAPE).archive()
    with pytest.raises(ValueError, match="not a lipnet-export archive"):
        runtime.build({"format": "other"})
    with pytest.raises(ValueError, match="version"):
        runtime.build({**archive, "format_version": 99})
    for target in ("builtins.eval", "aten._print.default", "os.system"):
        nodes = [dict(n, target=target) if n["op"] == "call_function" else n for n in archive["nodes"]]
        with pytest.raises(ValueError, match="allowlist"):
            runtime.build({**archive, "nodes": nodes})
    modules = {name: dict(spec, type="collections.Counter") for name, spec in archive["modules"].items()}
    with pytest.raises(ValueError, match="not one of"):
        runtime.build({**archive, "modules": modules})
    for bound in (float("nan"), float("inf"), -1.0, "1"):  # would make radii NaN or meaningless
        with pytest.raises(ValueError, match="lipschitz_bound"):
            runtime.build({**archive, "lipschitz_bound": bound})
    with pytest.raises(ValueError, match="lacks state_dict"):
        runtime.build({k: v for k, v in archive.items() if k != "state_dict"})


def _renamed(value, old, new):
    """The encoded graph with the node name ``old`` replaced everywhere by ``new``."""
    if isinstance(value, dict):
        return {k: (new if v == old and k in ("name", "$node") else _renamed(v, old, new)) for k, v in value.items()}
    return [_renamed(v, old, new) for v in value] if isinstance(value, list) else value


def test_archive_strings_never_reach_generated_code(tmp_path):
    """Names, paths, keywords and overload names from a file are checked or replaced, never pasted
    into the Python source torch.fx generates (each of these ran code once)."""
    archive = export(plain_net(), SHAPE).archive()
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    placeholder = archive["nodes"][0]["name"]
    evil_name = _renamed(archive["nodes"], placeholder, f"x={payload}")
    model = runtime.build({**archive, "nodes": evil_name})  # the archive's names only key the graph
    torch.testing.assert_close(model(torch.randn(2, *SHAPE)).shape, torch.Size([2, 10]))
    calls = [i for i, n in enumerate(archive["nodes"]) if n["op"] == "call_function"]
    attacks = []
    node = dict(archive["nodes"][calls[0]], kwargs={f"end_dim={payload} or -1, start_dim": 1})
    attacks.append(("keyword", [*archive["nodes"][:calls[0]], node, *archive["nodes"][calls[0] + 1:]], archive["modules"]))
    for overload in ("__init__", "__getattr__", "overloads"):
        target = archive["nodes"][calls[0]]["target"].rsplit(".", 1)[0] + "." + overload
        node = dict(archive["nodes"][calls[0]], target=target)
        attacks.append((overload, [*archive["nodes"][:calls[0]], node, *archive["nodes"][calls[0] + 1:]],
                        archive["modules"]))
    name = next(iter(archive["modules"]))
    evil_path = f'{name}"+{payload}+"'
    modules = {(evil_path if k == name else k): v for k, v in archive["modules"].items()}
    nodes = [dict(n, target=evil_path) if n["op"] == "call_module" and n["target"] == name else n
             for n in archive["nodes"]]
    attacks.append(("module path", nodes, modules))
    for what, nodes, modules in attacks:
        with pytest.raises(ValueError):
            runtime.build({**archive, "nodes": nodes, "modules": modules})(torch.randn(1, *SHAPE))
        assert not marker.exists(), what


def test_damaged_and_malformed_archives_are_value_errors(tmp_path):
    exported = export(plain_net(), SHAPE)
    path = tmp_path / "model.pt"
    exported.save(path)
    data = bytearray(path.read_bytes())
    record = data.find(b"data/0")  # the first tensor's record: flip a bit of its bytes
    assert record > 0
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data[:record + 200]) + bytes([data[record + 200] ^ 0x10]) + bytes(data[record + 201:]))
    with pytest.raises(ValueError, match="damaged"):
        load(damaged)
    import io

    with open(damaged, "rb") as f, pytest.raises(ValueError, match="damaged"):
        load(f)
    with pytest.raises(ValueError, match="damaged"):
        load(io.BytesIO(damaged.read_bytes()))
    with open(path, "rb") as f:
        assert load(f).lipschitz_bound == exported.lipschitz_bound  # the check leaves the file where it was
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(bytes(data[:len(data) // 2]))
    for bad in ("empty.pt", "cut.pt"):
        with pytest.raises(ValueError):
            load(tmp_path / bad)
    archive = exported.archive()
    nodes = archive["nodes"]
    for change in ({"modules": list(archive["modules"].values())},
                   {"modules": {k: {"type": v["type"]} for k, v in archive["modules"].items()}},
                   {"nodes": [{k: v for k, v in n.items() if k != "op"} for n in nodes]},
                   {"nodes": nodes[:-1]}, {"nodes": nodes + nodes[-1:]}, {"nodes": [nodes[0], nodes[0], *nodes[1:]]},
                   {"input_shape": 4}, {"input_shape": (0,)}, {"metadata": [1]},
                   {"state_dict": {**archive["state_dict"], "extra": torch.zeros(1)}},
                   {"state_dict": {k: v[:1] for k, v in archive["state_dict"].items()}},
                   {"nodes": [dict(n, args=[*n["args"], torch.zeros(3)]) if n["op"] == "call_function" else n
                              for n in nodes]},
                   {"nodes": [dict(n, args=[*n["args"], 1, 2, 3]) if n["op"] == "call_function" else n
                              for n in nodes]}):  # arguments the operators do not take: fails at load
        with pytest.raises(ValueError):
            runtime.build({**archive, **change})


def test_atomic_save_never_touches_the_umask(tmp_path, monkeypatch):
    monkeypatch.setattr("os.umask", lambda *args: pytest.fail("os.umask called"))
    runtime.atomic_save({"a": torch.zeros(2)}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["a"].shape == (2,)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_save_then_load(tmp_path):
    exported = export(train_steps(plain_net()), SHAPE)
    path = tmp_path / "model.pt"
    exported.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # written through a temporary file, renamed
    archive = torch.load(path, weights_only=True)
    assert archive["format"] == "lipnet-export" and archive["lipschitz_bound"] == exported.lipschitz_bound
    loaded = load(path)
    x = torch.randn(4, *SHAPE)
    assert torch.equal(loaded(x), exported(x))
    assert loaded.input_shape == SHAPE and loaded.metadata["lipnet_version"]


_WITHOUT_LIPNET = r"""
import importlib.util, json, sys
sys.modules["lipnet"] = None  # any `import lipnet...` now raises ImportError
try:
    import lipnet
except ImportError:
    pass
else:
    raise SystemExit("lipnet is importable")
import torch
runtime_path, model_path, data_path = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("lipnet_runtime", runtime_path)
lipnet_runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lipnet_runtime)
archive = torch.load(model_path, weights_only=True)
model = lipnet_runtime.build(archive)
data = torch.load(data_path, weights_only=True)
logits = model(data["x"])
print(json.dumps({
    "max_diff": float((logits - data["logits"]).abs().max()),
    "bound": model.lipschitz_bound,
    "radius_diff": float((model.certified_radius(logits) - data["radius"]).abs().max()),
    "lipnet_modules": sorted(name for name in sys.modules if name.startswith("lipnet") and sys.modules[name]),
}))
"""


def test_saved_model_runs_in_a_process_where_lipnet_cannot_be_imported(tmp_path):
    net = train_steps(every_layer_net())
    exported = export(net, SHAPE)
    exported.save(tmp_path / "model.pt")
    x = torch.randn(8, *SHAPE)
    logits = net.eval()(x).detach()
    torch.save({"x": x, "logits": logits, "radius": exported.certified_radius(logits)}, tmp_path / "data.pt")
    script = tmp_path / "deploy.py"
    script.write_text(_WITHOUT_LIPNET)
    result = subprocess.run([sys.executable, str(script), runtime.__file__, str(tmp_path / "model.pt"),
                             str(tmp_path / "data.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_diff"] <= 1e-6
    assert report["bound"] == exported.lipschitz_bound and math.isfinite(report["bound"])
    assert report["radius_diff"] == 0.0
    assert report["lipnet_modules"] == []


def test_runtime_file_imports_only_torch_and_the_standard_library():
    source = Path(runtime.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert "torch" in imports and imports - {"torch"} <= set(sys.stdlib_module_names)


def test_a_constant_network_exports_with_bound_zero_and_unbounded_radii():
    net = nn.Sequential(nn.Flatten(), GramLinear(4, 3))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    exported = runtime.build(export(net, (4,)).archive())
    assert exported.lipschitz_bound == 0.0
    logits = exported(torch.randn(2, 4))
    radii = exported.certified_radius(logits)
    assert torch.equal(radii, certified_radius(logits, logits.argmax(1), 0.0)) and bool((radii > 1e300).all())


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A crash at any point leaves the old file or the whole new one, also on power loss."""
    calls = []
    real_fsync, real_replace = runtime.os.fsync, runtime.os.replace

    def fsync(fd):
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(runtime.os, "fsync", fsync)
    monkeypatch.setattr(runtime.os, "replace", replace)
    runtime.atomic_write(tmp_path / "f.bin", lambda out: out.write(b"new bytes"))
    assert (tmp_path / "f.bin").read_bytes() == b"new bytes"
    assert calls == ["fsync file", "replace", "fsync folder"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_archive_with_non_finite_weights_is_refused(value):
    archive = export(plain_net(), SHAPE).archive()
    name = next(k for k, v in archive["state_dict"].items() if v.is_floating_point() and v.dim() >= 2)
    state_dict = {k: v.clone() for k, v in archive["state_dict"].items()}
    state_dict[name].view(-1)[0] = value  # its outputs are NaN or inf: no radius and no bound mean anything
    with pytest.raises(ValueError, match=f"non-finite.*{name}"):
        runtime.build({**archive, "state_dict": state_dict})


def test_layer_sizes_claimed_by_an_archive_allocate_nothing_before_its_tensors_are_checked():
    import resource

    archive = export(plain_net(), SHAPE).archive()
    name, spec = next((k, v) for k, v in archive["modules"].items() if v["type"] == "torch.nn.Linear")
    huge = {**archive["modules"], name: {**spec, "kwargs": {**spec["kwargs"], "in_features": 2**14,
                                                            "out_features": 2**14}}}  # a 1 GiB weight
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="size mismatch"):
        runtime.build({**archive, "modules": huge})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    assert grown_mib < 256, f"building the layers the archive names took {grown_mib:.0f} MiB"


def test_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "private.pt"
    runtime.atomic_write(path, lambda out: out.write(b"old"))
    os.chmod(path, 0o600)  # a user made it private: a plain open(path, "wb") keeps that
    runtime.atomic_write(path, lambda out: out.write(b"new"))
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("certify", [True, False])
def test_a_non_finite_bias_or_plain_weight_is_named_at_export(certify):
    net = plain_net()
    with torch.no_grad():
        net[5].bias[1] = float("nan")  # a Gram layer's bias: the Gram weight check did not look at it
    with pytest.raises(ValueError, match=r"cannot export: '5\.bias' .*NaN"):
        export(net, SHAPE, certify=certify)


def test_a_folder_that_cannot_be_fsynced_does_not_fail_a_completed_write(tmp_path, monkeypatch):
    """Some file systems (network, FUSE) refuse fsync on a folder with EINVAL: the file is
    already renamed into place, so raising would report a save that succeeded as failed."""
    import errno

    real_fsync = runtime.os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", fsync)
    runtime.atomic_write(tmp_path / "f.bin", lambda out: out.write(b"new bytes"))
    assert (tmp_path / "f.bin").read_bytes() == b"new bytes"


def test_an_export_that_cannot_be_opened_is_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    export(plain_net(), SHAPE).save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runtime.torch, "load", denied)
    with pytest.raises(OSError, match="Permission denied") as raised:
        load(path)
    assert "corrupt" not in str(raised.value)


@pytest.mark.parametrize("through_a_view", [False, True])
def test_a_graph_that_writes_to_its_stored_tensors_is_refused(through_a_view):
    """An in-place operator on a stored tensor (or a view of one) would change the network at
    every call: here it doubles the outputs each time, whatever bound the file states."""
    archive = export(plain_net(), SHAPE).archive()
    *body, output = archive["nodes"][1:]
    scaled = [{"name": "k", "op": "get_attr", "target": "k", "args": [], "kwargs": {}}]
    if through_a_view:
        scaled.append({"name": "kv", "op": "call_function", "target": "aten.view.default",
                       "args": [{"$node": "k"}, [1]], "kwargs": {}})
    scaled.append({"name": "k2", "op": "call_function", "target": "aten.mul_.Scalar",
                   "args": [{"$node": scaled[-1]["name"]}, 2.0], "kwargs": {}})
    nodes = [archive["nodes"][0], *scaled, *body,
             {"name": "y2", "op": "call_function", "target": "aten.mul.Tensor", "args": [output["args"][0], {"$node": "k"}],
              "kwargs": {}}, {**output, "args": [{"$node": "y2"}]}]
    state_dict = {**archive["state_dict"], "k": torch.ones(1)}
    with pytest.raises(ValueError, match="writes to a stored tensor"):
        runtime.build({**archive, "nodes": nodes, "state_dict": state_dict})
    pure = [n for n in nodes if n["name"] not in ("kv", "k2")]  # the same graph without the write loads
    model = runtime.build({**archive, "nodes": pure, "state_dict": state_dict})
    x = torch.randn(2, *SHAPE)
    assert torch.equal(model(x), model(x))


def test_saving_into_a_missing_folder_names_the_folder_not_a_temporary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder") as raised:
        export(plain_net(), SHAPE).save(tmp_path / "no-such-folder" / "model.pt")
    assert ".tmp" not in str(raised.value)


def test_an_archive_whose_check_run_would_exhaust_memory_is_refused_before_allocating():
    """The load-time run on a zero example is first made on the meta device: a tampered
    input_shape, or a graph node creating a huge tensor, is refused without allocating it."""
    import resource

    archive = export(plain_net(), SHAPE).archive()
    *body, output = archive["nodes"][1:]
    bomb = {"name": "z", "op": "call_function", "target": "aten.zeros.default",  # 1 GiB of zeros
            "args": [[2 ** 14, 2 ** 14]], "kwargs": {"device": {"$device": "cpu"}}}
    nodes = [archive["nodes"][0], bomb, *body, output]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="max_check_bytes.*by node"):
        runtime.build({**archive, "nodes": nodes})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    assert grown_mib < 256, f"refusing the archive took {grown_mib:.0f} MiB"
    with pytest.raises(ValueError, match="max_check_bytes.*input alone"):  # 768 KiB of input
        runtime.build({**archive, "input_shape": [3, 256, 256]}, max_check_bytes=2 ** 19)
    with pytest.raises(ValueError, match="max_check_bytes"):
        runtime.build(archive, max_check_bytes=0)
    # the untampered archive's run takes a few KiB
    model = runtime.build(archive, max_check_bytes=2 ** 16)
    assert model(torch.zeros(1, *SHAPE)).shape == (1, 10)


def test_the_runtime_radius_of_a_subnormal_bound_survives_flushed_denormals(flushed_denormals):
    """A stored bound of 1e-310: with subnormals flushed to 0, ``sqrt(2) L`` was a zero denominator and
    every radius infinite; the radius is ``(1e-9 - 2 delta) / (sqrt(2) 1e-310)``, about 7.07e300."""
    exported = export(nn.Sequential(GramLinear(2, 2)), (2,))
    exported.lipschitz_bound = 1e-310
    radius = float(exported.certified_radius(torch.tensor([[1e-9, 0.0]], dtype=torch.float64))[0])
    assert 7.0e300 < radius < 7.0711e300
    assert float(torch.tensor(2.0 ** -1022, dtype=torch.float64) / 2) == 0.0  # still flushing after
