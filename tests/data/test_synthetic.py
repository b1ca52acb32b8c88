"""Synthetic stand-ins: shapes, determinism, and test splits that are not the train split."""

import torch

from lipnet.data import synthetic_dataset


def test_the_same_seed_and_split_give_the_same_images():
    a, b = synthetic_dataset("cifar10", 12, split="test", seed=3), synthetic_dataset("cifar10", 12, split="test", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_a_test_split_shares_no_image_with_the_train_split():
    # one template per class plus noise: with equal noise the two splits were the same images
    for seed in (0, 1, -1):
        train = synthetic_dataset("mnist", 50, split="train", seed=seed).images.flatten(1)
        for other_seed in (0, 1, -1):
            test = synthetic_dataset("mnist", 50, split="test", seed=other_seed).images.flatten(1)
            assert not (train[:, None] == test[None]).all(-1).any(), (seed, other_seed)


def test_the_seed_sets_the_noise():
    a, b = synthetic_dataset("mnist", 8, seed=0), synthetic_dataset("mnist", 8, seed=1)
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.images, b.images)
