"""A new user's walk through ``python -m lipnet.certify`` with bad input: every mistake exits 2
with a message naming it, and no earlier result is lost."""

import json

import pytest
import torch

from lipnet.certify.cli import main
from lipnet.checkpoint import load_model
from lipnet.data import synthetic_dataset, write_npz


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    write_npz(synthetic_dataset("fashion-mnist", 16, split="test"), folder / "test.npz")
    return folder


def common(checkpoint, data):
    return ["--checkpoint", str(checkpoint), "--data", "fashion-mnist", "--data-dir", str(data), "--eps", "0.5",
            "--no-progress", "--device", "cpu"]


def test_out_into_a_folder_with_earlier_results_keeps_them(tmp_path, checkpoint, data, capsys):
    # A recipe's run folder: its report's plot, and the results of an earlier (full) certification.
    run = tmp_path / "run"
    run.mkdir()
    (run / "certified_accuracy.png").write_bytes(b"the recipe's plot")
    (run / "certify.json").write_text('{"n": 10000}\n')
    assert main([*common(checkpoint, data), "--limit", "4", "--out", str(run)]) == 2
    assert "holds earlier results (certify.json, certified_accuracy.png)" in capsys.readouterr().err
    assert (run / "certified_accuracy.png").read_bytes() == b"the recipe's plot"
    assert json.loads((run / "certify.json").read_text()) == {"n": 10000}
    assert main([*common(checkpoint, data), "--limit", "4", "--out", str(run), "--overwrite"]) == 0
    assert json.loads((run / "certify.json").read_text())["n"] == 4


def _truncated(tmp_path, checkpoint):
    path = tmp_path / "truncated.pt"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return path


def _exported(tmp_path, checkpoint):
    from lipnet import export

    model, _ = load_model(checkpoint)
    export(model, input_shape=(1, 28, 28)).save(tmp_path / "exported.pt")
    return tmp_path / "exported.pt"


def _state_dict(tmp_path, checkpoint):
    model, _ = load_model(checkpoint)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return tmp_path / "weights.pt"


def _run_folder(tmp_path, checkpoint):
    return checkpoint.parent


@pytest.mark.parametrize("make, message", [
    (_truncated, "truncated"),
    (_exported, "not a lipnet checkpoint"),
    (_state_dict, "not a lipnet checkpoint"),
    (_run_folder, "did you mean"),
])
def test_a_file_that_is_no_lipnet_checkpoint_exits_2_naming_it(tmp_path, checkpoint, data, capsys, make, message):
    path = make(tmp_path, checkpoint)
    before = path.read_bytes() if path.is_file() else None
    args = common(checkpoint, data)
    args[1] = str(path)
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert path.read_bytes() == before  # the file is kept as it was


@pytest.mark.parametrize("eps", ["0.1,,0.2", "0.1;0.2", "0", "-0.5", "", "36/0", "nan"])
def test_bad_eps_lists_are_refused_by_argparse(checkpoint, data, capsys, eps):
    args = common(checkpoint, data)
    args[args.index("--eps") + 1] = eps
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "argument --eps" in capsys.readouterr().err


def test_certifying_twice_into_a_new_folder_gives_the_same_numbers(tmp_path, checkpoint, data, capsys):
    for name in ("first", "second"):
        assert main([*common(checkpoint, data), "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    first, second = (json.loads((tmp_path / name / "certify.json").read_text()) for name in ("first", "second"))
    assert first["certified_accuracy"] == second["certified_accuracy"] and first["n"] == second["n"] == 16


def test_ctrl_c_during_the_audit_exits_130_and_keeps_the_certification(tmp_path, checkpoint, data, capsys,
                                                                        monkeypatch):
    import lipnet.certify.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "audit", interrupted)
    out = tmp_path / "out"
    try:
        code = main([*common(checkpoint, data), "--autoattack", "--attack-limit", "4", "--out", str(out)])
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped (a traceback)"
    captured = capsys.readouterr()
    assert code == 130
    assert "clean accuracy" in captured.out and "interrupted (Ctrl-C) during the AutoAttack audit" in captured.err
    summary = json.loads((out / "certify.json").read_text())
    assert summary["autoattack_interrupted"] is True and summary["autoattack"] == [] and summary["n"] > 0


def test_ctrl_c_during_the_certification_exits_130_with_a_line(checkpoint, data, capsys, monkeypatch):
    import lipnet.certify.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "certified_accuracy", interrupted)
    assert main(common(checkpoint, data)) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C): nothing was certified or written"
