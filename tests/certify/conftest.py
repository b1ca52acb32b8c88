"""Shared fixtures: a small data set of separable blobs and a network trained on it."""

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lipnet.checkpoint import save_model
from lipnet.models import build_model
from lipnet.nn import GramConv2d, GramLinear, InputNormalization, MaxMin


def make_blobs(n=256, seed=0):
    """Four well-separated classes of 1x8x8 images in [0, 1] (fixed centers, seeded noise)."""
    centers = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = (centers[y] + 0.05 * torch.randn(n, 1, 8, 8, generator=gen)).clamp(0, 1)
    return x, y


def make_small_net():
    return nn.Sequential(InputNormalization([0.5], [0.5]), GramConv2d(1, 8, 3, padding=1), MaxMin(),
                         GramConv2d(8, 8, 2, stride=2), MaxMin(), nn.Flatten(), GramLinear(8 * 4 * 4, 4))


def train(net, steps=60):
    torch.manual_seed(0)
    x, y = make_blobs()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x) * 8, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


@contextmanager
def one_thread():
    """Small tensors on a shared, loaded CPU run far faster on one thread (no OpenMP waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def blobs():
    return make_blobs


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return make_small_net()


@pytest.fixture(scope="session")
def _trained_once():
    torch.manual_seed(0)  # session fixtures run before the per-test seeding
    with one_thread():
        return train(make_small_net())


@pytest.fixture
def trained_net(_trained_once):
    """A fresh copy of a network trained once per session (tests may change it)."""
    return copy.deepcopy(_trained_once)


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained Fashion-MNIST ConvNet saved by lipnet.checkpoint (for the certify command line)."""
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=10, input_size=28, widths=[8], depths=[0],
                        dense=[16], mean=[0.29], std=[0.35])
    return save_model(tmp_path / "model.pt", model, dataset="fashion-mnist")
