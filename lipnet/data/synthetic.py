"""Small synthetic stand-ins for the registered data sets (tests, smoke runs, offline docs)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from lipnet.data.registry import ImageDataset, dataset_info
from lipnet.export.runtime import atomic_write


def synthetic_dataset(name: str, n: int, *, split: str = "train", seed: int = 0, noise: float = 0.25) -> ImageDataset:
    """``n`` images shaped like data set ``name``: one fixed random template per class plus noise.

    The templates are random 4x4 patterns upsampled to the image size (so that small
    translations keep them recognizable); they depend only on ``name``, so train and test
    splits share them. The labels cycle through the classes and the noise depends on
    ``seed`` and ``split`` (a test split never repeats the train split's images, whatever the
    seeds). A small network separates the classes within a few steps.

    Example:
        >>> data = synthetic_dataset("cifar10", 20)
        >>> data.images.shape, data.images.dtype
        (torch.Size([20, 3, 32, 32]), torch.uint8)
    """
    info = dataset_info(name)
    if not 0 <= noise <= 1:  # pixels outside [0, 255] would wrap around in uint8
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    channels, height, width = info.shape
    coarse = torch.rand((info.num_classes, channels, 4, 4), generator=torch.Generator().manual_seed(12345))
    templates = torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest")
    labels = torch.arange(n) % info.num_classes
    noise_values = torch.rand((n, *info.shape), generator=torch.Generator().manual_seed(_noise_seed(seed, split)))
    images = (1 - noise) * templates[labels] + noise * noise_values
    return ImageDataset((images * 255).round().to(torch.uint8), labels, info, split, f"synthetic (seed {seed})")


def _noise_seed(seed: int, split: str) -> int:
    """``seed`` for the train split; for any other, a seed hashed from ``(seed, split)`` that
    no non-negative train seed gives, and that differs between splits with overwhelming probability."""
    if split == "train":
        return seed
    state = np.random.SeedSequence([seed % 2**64, zlib.crc32(split.encode())]).generate_state(1, np.uint64)
    return int(state[0]) | 2**63


def write_npz(data: ImageDataset, path: str | Path) -> Path:
    """Save a split as ``.npz`` with ``x`` (uint8 NHWC) and ``y``, the format :func:`load_dataset` reads.

    ``.npz`` is appended to a name without it (as ``numpy.savez`` does); the file is written
    atomically (:func:`~lipnet.export.runtime.atomic_write`): a failed write keeps the previous one.
    Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y = data.images.permute(0, 2, 3, 1).cpu().numpy(), data.labels.cpu().numpy()
    atomic_write(path, lambda out: np.savez(out, x=x, y=y))
    return path
