"""Iterate over a data set that lives on the device as uint8, without a Python data loader."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from lipnet.data.augment import random_crop_flip
from lipnet.data.registry import ImageDataset


_EPOCHS, _STREAMS = 1_000_003, 101  # the packed range of (epoch, stream) pairs


def epoch_generator(seed: int, epoch: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator determined by ``(seed, epoch, stream)``: epochs replay exactly after a resume.

    Seeds below ``2**63`` pack ``(seed, epoch, stream)`` for epochs below 1,000,003 and streams
    below 101, so two such triples of a run's seed never share one; other triples (stream
    ``1 + rank`` beyond rank 99) get a 63-bit hash at or above ``2**63``, outside the packing."""
    generator = torch.Generator(device=device)
    if 0 <= epoch < _EPOCHS and 0 <= stream < _STREAMS:
        # Reduced to torch's seed range (small seeds are unchanged, so earlier runs replay).
        value = ((seed * _EPOCHS + epoch) * _STREAMS + stream) % 2 ** 63
    else:
        # Beyond the packed range (stream 101 is rank 100's augmentation), the packing would
        # repeat another triple's seed: hash instead, into the seeds the packing never gives.
        digest = hashlib.blake2b(f"{seed},{epoch},{stream}".encode(), digest_size=8).digest()
        value = 2 ** 63 + (int.from_bytes(digest, "little") >> 1)
    generator.manual_seed(value)
    return generator


class DeviceLoader:
    """Shuffled, augmented mini-batches of a data set held on one device.

    The images stay uint8 on ``device``; each batch is cropped/flipped there
    (:func:`random_crop_flip`) and converted to float in ``[0, 1]``. The order of an epoch
    depends only on ``(seed, epoch)`` and is the same on every process; with
    ``world_size > 1`` process ``rank`` takes every ``world_size``-th example of it. With
    ``drop_last`` (training) every process gets the same number of full batches, the last
    ``len(data) % world_size`` examples of the order left out; without it (evaluation) every
    example is read once, and the shards differ by at most one example (so their numbers of
    batches may differ by one: nothing per batch may wait for the other processes).

    Args:
        data: the split, on any device (moved to ``device`` once).
        batch_size: examples per batch *per process*.
        device: where the data and the batches live.
        shuffle, drop_last: as in ``torch.utils.data.DataLoader``.
        padding, flip: augmentation (see :func:`random_crop_flip`); ``0, False`` for none.
        seed: base seed of the order and the augmentation.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, data: ImageDataset, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = True, padding: int = 0, flip: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:  # another rank would read other ranks' examples
            raise ValueError(f"rank must lie in [0, world_size) and world_size be >= 1, got rank {rank} of "
                             f"world_size {world_size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.padding, self.flip = padding, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_rank = len(data) // world_size
        if drop_last and per_rank < batch_size:
            raise ValueError(f"{len(data)} examples over {world_size} process(es) are fewer than one batch of "
                             f"{batch_size}: lower batch_size or use more data")

    def _shard_size(self) -> int:
        n = len(self.data)
        if self.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        per_rank = self._shard_size()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``(x, y)`` of one epoch: ``x`` float32 in [0, 1], ``y`` int64."""
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, epoch))
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        order = order[self.rank::self.world_size].to(self.device)
        augment = self.padding > 0 or self.flip
        generator = epoch_generator(self.seed, epoch, stream=1 + self.rank, device=self.device) if augment else None
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.data.images[idx]
            if augment:
                images = random_crop_flip(images, self.padding, self.flip, generator)
            yield images.float().div_(255), self.data.labels[idx]
