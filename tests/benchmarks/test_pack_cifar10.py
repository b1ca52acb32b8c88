"""benchmarks/pack_cifar10.py: the three device folders read back as the original data set."""

import sys

import pytest
import torch

from lipnet.data.sources import load_dataset
from lipnet.data.synthetic import synthetic_dataset, write_npz


def test_folders_put_together_are_the_original(tmp_path, pack_module):
    train = synthetic_dataset("cifar10", 10, split="train")
    test = synthetic_dataset("cifar10", 3, split="test", seed=1)
    write_npz(train, tmp_path / "src" / "train.npz")
    write_npz(test, tmp_path / "src" / "test.npz")
    written = pack_module.pack(tmp_path / "src", tmp_path / "out", splits=((0, 4), (4, 8), (8, 10)))
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "s1/train-1-of-3.npz", "s2/train-2-of-3.npz", "s3/test.npz", "s3/train-3-of-3.npz"]
    together = tmp_path / "together"
    together.mkdir()
    for path in written:
        (together / path.name).write_bytes(path.read_bytes())
    for split, original in (("train", train), ("test", test)):
        back = load_dataset("cifar10", split, data_dir=together)
        assert torch.equal(back.images, original.images) and torch.equal(back.labels, original.labels)


def test_wrong_count_is_refused(tmp_path, pack_module):
    write_npz(synthetic_dataset("cifar10", 5, split="train"), tmp_path / "src" / "train.npz")
    write_npz(synthetic_dataset("cifar10", 2, split="test"), tmp_path / "src" / "test.npz")
    with pytest.raises(SystemExit, match="expected 50000 training images"):
        pack_module.pack(tmp_path / "src", tmp_path / "out")


def test_webp_folders_unpacked_together_are_the_original(tmp_path, pack_module):
    train = synthetic_dataset("cifar10", 10, split="train")
    test = synthetic_dataset("cifar10", 3, split="test", seed=1)
    write_npz(train, tmp_path / "src" / "train.npz")
    write_npz(test, tmp_path / "src" / "test.npz")
    written = pack_module.pack_webp(tmp_path / "src", tmp_path / "out", splits=((0, 6), (6, 10)))
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "w1/webp-train-1-of-2.npz", "w2/webp-test.npz", "w2/webp-train-2-of-2.npz"]
    together = tmp_path / "together"
    for path in written:
        assert pack_module.main(["--unpack", str(path), str(together)]) == 0
    assert sorted(p.name for p in together.iterdir()) == ["test.npz", "train-1-of-2.npz", "train-2-of-2.npz"]
    for split, original in (("train", train), ("test", test)):
        back = load_dataset("cifar10", split, data_dir=together)
        assert torch.equal(back.images, original.images) and torch.equal(back.labels, original.labels)


def test_a_damaged_webp_pack_is_refused(tmp_path, pack_module):
    import numpy as np

    write_npz(synthetic_dataset("cifar10", 4, split="train"), tmp_path / "src" / "train.npz")
    write_npz(synthetic_dataset("cifar10", 2, split="test"), tmp_path / "src" / "test.npz")
    (path, _) = pack_module.pack_webp(tmp_path / "src", tmp_path / "out", splits=((0, 4),))
    with np.load(path) as packed:
        arrays = dict(packed)
    arrays["sha256"] = arrays["sha256"].copy()
    arrays["sha256"][0] ^= 1  # as if one image had decoded differently
    np.savez(path, **arrays)
    with pytest.raises(SystemExit, match="do not match the SHA-256"):
        pack_module.unpack_webp(path, tmp_path / "together")
    with pytest.raises(SystemExit, match="not a WebP pack"):
        pack_module.unpack_webp(tmp_path / "src" / "train.npz", tmp_path / "together")


def test_webp_packs_decode_with_opencv_where_pillow_lacks_webp(tmp_path, pack_module, monkeypatch):
    """The device image has OpenCV beside Pillow: a Pillow built without WebP falls back to it
    (OpenCV decodes to BGR; the unpacked shard must still be RGB, as the SHA-256 check demands)."""
    import io
    import types

    import numpy as np
    from PIL import Image, features

    train = synthetic_dataset("cifar10", 4, split="train")
    write_npz(train, tmp_path / "src" / "train.npz")
    write_npz(synthetic_dataset("cifar10", 2, split="test"), tmp_path / "src" / "test.npz")
    (path, _) = pack_module.pack_webp(tmp_path / "src", tmp_path / "out", splits=((0, 4),))

    def imdecode(buffer, flags):  # OpenCV's contract: BGR, or None for bytes it cannot read
        return np.asarray(Image.open(io.BytesIO(buffer.tobytes())).convert("RGB"))[..., ::-1].copy()

    fake_cv2 = types.SimpleNamespace(IMREAD_COLOR=1, COLOR_BGR2RGB=4, imdecode=imdecode,
                                     cvtColor=lambda image, code: image[..., ::-1].copy())
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2)
    monkeypatch.setattr(features, "check", lambda name: False)
    out = pack_module.unpack_webp(path, tmp_path / "together")
    with np.load(out) as unpacked:
        assert np.array_equal(unpacked["x"], train.images.permute(0, 2, 3, 1).numpy())


def test_without_pillow_webp_or_opencv_unpacking_says_what_is_missing(pack_module, monkeypatch):
    from PIL import features

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    monkeypatch.setattr(features, "check", lambda name: False)
    with pytest.raises(SystemExit, match="Pillow built with WebP support or OpenCV"):
        pack_module.webp_decoder()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_instead_of_reading_a_folder_named_help(flag, pack_module, capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # a pack would write .data here
    assert pack_module.main([flag]) == 0
    assert "python benchmarks/pack_cifar10.py [SOURCE] [DEST]" in capsys.readouterr().out
    assert not (tmp_path / ".data").exists()
