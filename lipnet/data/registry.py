"""The data sets lipnet knows: names, shapes, classes and normalization statistics."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: registry name (``"cifar10"``, ...).
        shape: ``(C, H, W)`` of one image.
        num_classes: number of labels (``0 .. num_classes - 1``).
        mean, std: per-channel statistics of the training images, in ``[0, 1]`` pixel units.
        torchvision_class: name of the ``torchvision.datasets`` class that downloads it.
        torchvision_folder: the folder that class creates under its ``root``.
        system_dirs: folders where system packages install it (Debian's ``dataset-*``).
        how_to_get: one line for the error message when it cannot be found.
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str
    torchvision_folder: str
    system_dirs: tuple[str, ...] = ()
    how_to_get: str = ""

    def to_dict(self) -> dict:
        """Plain-Python form (lists, not tuples), safe for ``torch.load(weights_only=True)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ImageDataset:
    """A whole split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str
    source: str

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if tuple(self.images.shape[1:]) != tuple(self.info.shape):
            raise ValueError(f"{self.info.name} images must have shape {self.info.shape}, got "
                             f"{tuple(self.images.shape[1:])} (from {self.source})")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be an int64 tensor of shape ({len(self.images)},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)} (from {self.source})")
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < self.info.num_classes):
            raise ValueError(f"{self.info.name} labels must lie in [0, {self.info.num_classes}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}] (from {self.source})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.info.std

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    def fingerprint(self) -> str:
        """SHA-256 of the labels and the pixels (hex): equal for the same examples in the same
        order wherever they were read from, different for any other images."""
        digest = hashlib.sha256()
        for tensor in (self.labels, self.images):
            digest.update(tensor.detach().cpu().contiguous().numpy())
        return digest.hexdigest()

    def subset(self, n: int | None) -> "ImageDataset":
        """The first ``n`` examples (all of them for ``None``)."""
        if n is not None and n < 0:
            raise ValueError(f"subset size must be >= 0 (or None for all), got {n}")
        if n is None or n >= len(self):
            return self
        return ImageDataset(self.images[:n], self.labels[:n], self.info, self.split, f"{self.source} (first {n})")

    def to(self, device) -> "ImageDataset":
        """The same split with images and labels on ``device`` (images stay uint8)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.info, self.split, self.source)


_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST", "FashionMNIST",
            system_dirs=("/usr/share/datasets/fashion-mnist",),
            how_to_get="on Debian/Ubuntu `apt-get install dataset-fashion-mnist`; elsewhere pass --download",
        ),
        DatasetInfo(
            "mnist", (1, 28, 28), 10, _MNIST_MEAN, _MNIST_STD, "MNIST", "MNIST",
            how_to_get="pass --download (torchvision fetches it), or put the four IDX files in DATA_DIR/MNIST/raw/",
        ),
        DatasetInfo(
            "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10",
            "cifar-10-batches-py",
            how_to_get="pass --download (torchvision fetches it), or pass --data-dir to a folder with "
                       "cifar-10-batches-py/ or with train.npz/test.npz",
        ),
        DatasetInfo(
            "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100",
            "cifar-100-python",
            how_to_get="pass --download (torchvision fetches it), or pass --data-dir to a folder with "
                       "cifar-100-python/ or with train.npz/test.npz",
        ),
    ]
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``, with a clear error for unknown names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):  # TypeError: a list or another unhashable value
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
