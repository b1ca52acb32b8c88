"""Batched crop/flip augmentation and the device-resident loader."""

import pytest
import torch
from torch.nn import functional as F

from lipnet.data import DATASETS, DeviceLoader, ImageDataset, random_crop_flip


def test_each_output_is_a_shifted_and_possibly_mirrored_window():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, padding=2, flip=True, generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    shifts, flips = set(), 0
    for i in range(len(x)):
        matches = [(dy, dx, m) for dy in range(5) for dx in range(5) for m in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if m else w)(padded[i, :, dy:dy + 6, dx:dx + 5]))]
        assert matches, f"image {i} is not a window of its padded input"
        shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(shifts) > 10 and 16 <= flips <= 48
    again = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (4, 1, 7, 7), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x), x)


def toy(n=40):
    info = DATASETS["mnist"]
    return ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8), torch.arange(n) % 10, info,
                        "train", "toy")


def test_loader_order_depends_on_epoch_and_seed_only():
    data = toy()
    a = DeviceLoader(data, 8, seed=1)
    b = DeviceLoader(data, 8, seed=1)
    ya = [y for _, y in a.epoch(3)]
    assert len(ya) == len(a) == 5
    assert all(torch.equal(u, v) for u, v in zip(ya, [y for _, y in b.epoch(3)]))
    assert not all(torch.equal(u, v) for u, v in zip(ya, [y for _, y in a.epoch(4)]))
    x, _ = next(a.epoch(0))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def read_shards(n: int, world_size: int, epoch: int = 0, batch_size: int = 4) -> list[list[list[int]]]:
    """Per rank, the batches of example indices one evaluation epoch (no drop_last) reads from
    ``n`` examples whose pixels hold their index."""
    data = toy(n)
    data.images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    shards = []
    for rank in range(world_size):
        loader = DeviceLoader(data, batch_size, seed=0, rank=rank, world_size=world_size, drop_last=False)
        batches = [x[:, 0, 0, 0].mul(255).round().long().tolist() for x, _ in loader.epoch(epoch)]
        assert len(batches) == len(loader)
        shards.append(batches)
    return shards


def test_ranks_split_each_epoch_into_disjoint_equal_shards():
    shards = read_shards(42, 3)
    assert all(len(batches) == 4 and sum(map(len, batches)) == 14 for batches in shards)
    assert sorted(i for batches in shards for batch in batches for i in batch) == list(range(42))


def test_too_little_data_for_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        DeviceLoader(toy(10), 8, world_size=2)


def test_every_seed_the_config_accepts_seeds_the_epochs():
    from lipnet.data.loader import epoch_generator

    for seed in (0, 99_999_999_999_999, 2 ** 63 - 1):
        a, b = (torch.randint(0, 1000, (4,), generator=epoch_generator(seed, e)) for e in (3, 4))
        assert torch.equal(a, torch.randint(0, 1000, (4,), generator=epoch_generator(seed, 3)))
        assert not torch.equal(a, b)


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0), (0, -1)])
def test_a_rank_outside_the_world_is_an_error_not_an_overlapping_shard(rank, world_size):
    # rank 2 of 2 would read rank 0's examples shifted by one; rank -1 the last example only
    with pytest.raises(ValueError, match="rank|world_size"):
        DeviceLoader(toy(), 4, rank=rank, world_size=world_size, drop_last=False)


def test_negative_padding_is_refused_when_the_loader_is_made():
    with pytest.raises(ValueError, match="padding"):
        DeviceLoader(toy(), 4, padding=-1)


def test_crop_flip_names_what_it_takes():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_crop_flip(x[0], padding=1)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, padding=1.5)


def test_a_negative_subset_is_an_error_not_all_but_the_last_examples():
    with pytest.raises(ValueError, match="subset"):
        toy(10).subset(-1)  # images[:-1] would silently drop the last example
    assert len(toy(10).subset(0)) == 0 and len(toy(10).subset(3)) == 3 and len(toy(10).subset(None)) == 10


def test_the_generators_of_a_hundred_and_more_ranks_do_not_repeat_the_order_or_each_other():
    from lipnet.data.loader import epoch_generator

    # stream 1 + rank: rank 100's stream 101 packed as (epoch + 1, stream 0) before, i.e. its
    # augmentation of epoch e drew the same numbers as the shuffle of epoch e + 1
    seeds = {(epoch, stream): epoch_generator(7, epoch, stream).initial_seed()
             for epoch in range(3) for stream in range(0, 260)}
    assert len(set(seeds.values())) == len(seeds)
    assert epoch_generator(7, 2, 101).initial_seed() != epoch_generator(7, 3, 0).initial_seed()
    # streams of the packed range keep their seeds (earlier runs replay after a resume)
    assert epoch_generator(7, 2, 5).initial_seed() == (7 * 1_000_003 + 2) * 101 + 5
    # and the hashed ones are stable across calls
    assert epoch_generator(7, 2, 150).initial_seed() == epoch_generator(7, 2, 150).initial_seed()


def test_without_drop_last_the_ranks_read_every_example_once():
    # evaluation: 43 examples over 3 processes used to lose the 43rd (n % world_size dropped)
    seen = [i for batches in read_shards(43, 3, epoch=2) for batch in batches for i in batch]
    assert len(seen) == 43 and sorted(seen) == list(range(43))
    data = toy(43)
    # training keeps equal shards of full batches
    assert {len(DeviceLoader(data, 4, rank=r, world_size=3)) for r in range(3)} == {3}
