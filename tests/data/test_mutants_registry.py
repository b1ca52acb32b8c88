"""Mutation tests of lipnet.data.registry and lipnet.data.synthetic: each test pins a behaviour
that a hand-made mutant broke without any other test failing."""

import pytest
import torch

from lipnet.data import DATASETS, ImageDataset, synthetic_dataset, write_npz


def test_the_registered_data_sets_and_their_statistics():
    """The per-channel statistics of each training split (in [0, 1] pixel units; checked against
    the real Fashion-MNIST and CIFAR-10 training images: 0.2860/0.3530 and 0.4914, 0.4822, 0.4465 /
    0.2470, 0.2435, 0.2616). The models divide by std inside, so the certified radii in pixel
    units scale with it: a wrong or swapped value changes every certificate."""
    rows = {name: (info.shape, info.num_classes, info.mean, info.std, info.torchvision_class,
                   info.torchvision_folder, info.system_dirs) for name, info in DATASETS.items()}
    assert rows == {
        "fashion-mnist": ((1, 28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST", "FashionMNIST",
                          ("/usr/share/datasets/fashion-mnist",)),
        "mnist": ((1, 28, 28), 10, (0.1307,), (0.3081,), "MNIST", "MNIST", ()),
        "cifar10": ((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10",
                    "cifar-10-batches-py", ()),
        "cifar100": ((3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100",
                     "cifar-100-python", ()),
    }


def dataset(labels, shape=(1, 28, 28)):
    return ImageDataset(torch.zeros(len(labels), *shape, dtype=torch.uint8), torch.tensor(labels), DATASETS["mnist"],
                        "test", "hand-made")


def test_an_image_dataset_refuses_the_label_num_classes_and_images_of_another_shape():
    assert dataset([0, 9]).labels.tolist() == [0, 9]
    with pytest.raises(ValueError, match=r"mnist labels must lie in \[0, 10\), got \[0, 10\] \(from hand-made\)"):
        dataset([0, 10])
    with pytest.raises(ValueError, match=r"mnist images must have shape \(1, 28, 28\), got \(1, 28, 27\)"):
        dataset([0, 1], shape=(1, 28, 27))


def test_the_fingerprint_covers_the_labels():
    """Same pixels, other labels: another fingerprint (a resume would train on other targets)."""
    assert dataset([0, 1]).fingerprint() != dataset([1, 0]).fingerprint()
    assert dataset([0, 1]).fingerprint() == dataset([0, 1]).fingerprint()


def test_a_subset_keeps_each_image_with_its_label():
    data = synthetic_dataset("mnist", 12)
    sub = data.subset(5)
    assert torch.equal(sub.images, data.images[:5]) and sub.labels.tolist() == [0, 1, 2, 3, 4]
    assert sub.source == "synthetic (seed 0) (first 5)"


def test_noise_free_synthetic_images_depend_only_on_the_label():
    """With noise 0 an image is its class's template, whatever n, split and seed: train and test
    share the templates, and each image goes with its own label."""
    a = synthetic_dataset("cifar10", 10, noise=0.0)
    b = synthetic_dataset("cifar10", 15, split="test", seed=3, noise=0.0)
    assert b.labels.tolist() == [i % 10 for i in range(15)]
    for i in range(15):
        assert torch.equal(b.images[i], a.images[i % 10])
    assert len({a.images[k].numpy().tobytes() for k in range(10)}) == 10


def test_synthetic_data_is_the_same_as_in_earlier_versions():
    """Runs and checkpoints on synthetic data (the tests, the docs' miniature run) resume only on
    the same examples: pinned fingerprints of a train and a test split. (torch's CPU generator
    is stable across versions; a change here means old synthetic runs no longer resume.)"""
    assert synthetic_dataset("mnist", 8).fingerprint() == TRAIN_FINGERPRINT
    assert synthetic_dataset("mnist", 8, split="test").fingerprint() == TEST_FINGERPRINT


TRAIN_FINGERPRINT = "bec154009f2c4a99fe02a0d23b64e2b0113e4e1da0589a3dd04eed2d513f4dcc"
TEST_FINGERPRINT = "21ba885469aac01edf0cb20ea8af04cf5c2ab683244e2a32b74b7cfae809580e"


def test_write_npz_appends_the_suffix_as_numpy_does(tmp_path):
    data = synthetic_dataset("mnist", 3)
    assert write_npz(data, tmp_path / "train") == tmp_path / "train.npz"
    assert write_npz(data, tmp_path / "test.npz") == tmp_path / "test.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz", "train.npz"]


def test_an_image_dataset_refuses_images_that_are_not_uint8():
    """Float images would be divided by 255 a second time by the loader."""
    with pytest.raises(ValueError, match=r"images must be a uint8 tensor \(N, C, H, W\), got torch.float32"):
        ImageDataset(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), DATASETS["mnist"], "test", "hand-made")
