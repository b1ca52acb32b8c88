"""Mutation tests of lipnet.data.sources (finding a data set, downloading it, the warnings about
it): each test pins a behaviour that a hand-made mutant broke without any other test failing."""

import warnings

import pytest

from lipnet.data import DatasetNotFoundError, load_dataset, synthetic_dataset, write_npz


@pytest.mark.parametrize("split", ["train", "test"])
def test_download_fetches_the_split_asked_for_into_a_data_dir_that_does_not_exist_yet(tmp_path, monkeypatch, split):
    """--download with a --data-dir not created yet: torchvision is asked for that split
    (train=True for "train" only) with the folder as its root, and the split is read from there."""
    import torchvision

    root, calls = tmp_path / "new" / "data", []

    def fetch(root_arg, train, download):  # what torchvision does: create root, put the split there
        calls.append((root_arg, train, download))
        write_npz(synthetic_dataset("cifar10", 20, split="train" if train else "test"),
                  f"{root_arg}/{'train' if train else 'test'}.npz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fetch)
    data = load_dataset("cifar10", split, data_dir=root, download=True)
    assert calls == [(str(root), split == "train", True)]
    assert data.split == split and data.source == str(root / f"{split}.npz")
    assert data.fingerprint() == synthetic_dataset("cifar10", 20, split=split).fingerprint()


def write_classes(path, classes: int, n: int):
    """``n`` CIFAR-10-shaped examples whose labels cycle through the first ``classes`` classes."""
    data = synthetic_dataset("cifar10", n)
    data.labels = data.labels % classes
    write_npz(data, path)


def test_only_a_split_of_ten_examples_per_class_or_more_is_warned_about_missing_classes(tmp_path):
    """99 examples of 9 classes could be a small subset of CIFAR-10: no warning. 100 examples
    would hold 10 of each class: the missing class is warned about."""
    write_classes(tmp_path / "small" / "test.npz", 9, 99)
    write_classes(tmp_path / "large" / "test.npz", 9, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("cifar10", "test", data_dir=tmp_path / "small")) == 99
    with pytest.warns(UserWarning, match="has 100 examples but only 9 of its 10 classes"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "large")


def test_the_not_found_message_lists_every_folder_searched_in_order(tmp_path, monkeypatch):
    """One line per folder, in the order searched: data_dir/<name>, then data_dir (mnist has no
    system folder)."""
    monkeypatch.delenv("LIPNET_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", "test", data_dir=tmp_path)
    looked = str(error.value).split("Looked in:\n")[1].split("\nfor any of:")[0]
    assert looked.splitlines() == [f"  - {tmp_path.absolute() / 'mnist'}", f"  - {tmp_path.absolute()}"]


def test_a_data_dir_that_is_a_file_is_called_not_a_folder(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(DatasetNotFoundError, match=r"the data folder .*data is not a folder\. Point --data-dir"):
        load_dataset("mnist", "test", data_dir=tmp_path / "data")
    with pytest.raises(DatasetNotFoundError, match=r"the data folder .*missing does not exist\. Point --data-dir"):
        load_dataset("mnist", "test", data_dir=tmp_path / "missing")
