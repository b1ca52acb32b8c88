"""Mutation tests of lipnet.data.loader and lipnet.data.augment: each test pins a behaviour that
a hand-made mutant broke without any other test failing."""

import torch

from lipnet.data import DATASETS, DeviceLoader, ImageDataset, epoch_generator, random_crop_flip


def indexed(n):
    """``n`` MNIST-labelled examples; image ``i`` holds pixel values ``i, i + 1, ...`` (mod 256)
    and label ``i % 10``, so that every output can be traced back to its example."""
    info = DATASETS["mnist"]
    pixels = (torch.arange(n)[:, None] + torch.arange(28 * 28)) % 256
    return ImageDataset(pixels.to(torch.uint8).view(n, 1, 28, 28), torch.arange(n) % 10, info, "train", "indexed")


def test_batches_are_the_pixels_over_255_with_their_own_labels():
    """Without augmentation or shuffling: x is exactly uint8 / 255 (255 gives 1.0), y the labels of
    the same examples."""
    data = indexed(12)
    data.images[3, 0, 0, 0] = 255
    batches = list(DeviceLoader(data, 4, shuffle=False, drop_last=False).epoch(0))
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, data.images.float() / 255)
    assert x[3, 0, 0, 0] == 1.0 and x[0, 0, 0, 0] == 0.0
    assert torch.cat([b[1] for b in batches]).tolist() == data.labels.tolist()


def test_each_rank_augments_with_its_own_stream_1_plus_rank():
    """Rank r crops and flips its batches with epoch_generator(seed, epoch, stream=1 + r), one
    generator through the epoch: never the stream of the order (0), nor another rank's, so the
    ranks' augmentations are independent."""
    data = indexed(24)
    seed, epoch, batch = 5, 3, 4
    order = torch.randperm(24, generator=epoch_generator(seed, epoch))
    for rank in range(2):
        loader = DeviceLoader(data, batch, padding=2, flip=True, seed=seed, rank=rank, world_size=2)
        generator = epoch_generator(seed, epoch, stream=1 + rank)
        mine = order[rank::2]
        got = list(loader.epoch(epoch))
        assert len(got) == 3
        for i, (x, y) in enumerate(got):
            idx = mine[i * batch:(i + 1) * batch]
            expected = random_crop_flip(data.images[idx], 2, True, generator)
            assert torch.equal(x, expected.float() / 255)
            assert torch.equal(y, data.labels[idx])


def test_flip_alone_augments():
    """flip=True with padding=0 still flips (half of the images, by stream 1)."""
    data = indexed(16)
    (x, _), = DeviceLoader(data, 16, shuffle=False, flip=True, seed=2).epoch(0)
    mirrored = [not torch.equal(x[i], data.images[i].float() / 255) for i in range(16)]
    assert torch.equal(x, random_crop_flip(data.images, 0, True, epoch_generator(2, 0, stream=1)).float() / 255)
    assert 0 < sum(mirrored) < 16
    for i in range(16):
        assert torch.equal(x[i] * 255, data.images[i].flip(-1).float() if mirrored[i] else data.images[i].float())


def test_without_shuffle_the_order_is_the_data_s():
    data = indexed(10)
    loader = DeviceLoader(data, 3, shuffle=False, drop_last=True)
    assert [y.tolist() for _, y in loader.epoch(7)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_drop_last_gives_only_full_batches():
    loader = DeviceLoader(indexed(10), 4, shuffle=False, drop_last=True)
    assert len(loader) == 2 and [len(y) for _, y in loader.epoch(0)] == [4, 4]


def test_crop_offsets_are_drawn_independently_for_rows_and_columns_and_per_image():
    """The vertical and the horizontal shift of each image are two draws, and every image of a
    batch gets its own (a single shared draw would move the whole batch together)."""
    n, padding = 400, 2
    x = torch.zeros(n, 1, 5, 5, dtype=torch.uint8)
    x[:, :, 0, 0] = 1  # the top-left pixel: where it lands gives (dy, dx)
    out = random_crop_flip(x, padding, False, torch.Generator().manual_seed(0))
    seen = out[:, 0].nonzero()  # (image, row, col) of the visible ones
    shifts = {(int(r), int(c)) for _, r, c in seen}
    assert shifts == {(r, c) for r in range(3) for c in range(3)}  # dy, dx in {2, 1, 0} x {2, 1, 0}
    rows_cols = torch.zeros(3, 3)
    for _, r, c in seen:
        rows_cols[r, c] += 1
    assert rows_cols.min() > 0 and (rows_cols.diagonal().sum() < rows_cols.sum() / 2)


def test_the_padding_is_zero_and_no_augmentation_returns_a_copy():
    x = torch.full((8, 1, 3, 3), 7, dtype=torch.uint8)
    out = random_crop_flip(x, 3, False, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0, 7} and (out == 0).any()
    same = random_crop_flip(x)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    same[0, 0, 0, 0] = 1
    assert x[0, 0, 0, 0] == 7


def test_without_drop_last_a_larger_shard_gets_its_extra_batch():
    """43 examples over 3 ranks in batches of 7: rank 0 holds 15 examples (3 batches, the last of
    one), ranks 1 and 2 hold 14 (2 batches); together every example once."""
    data = indexed(43)
    seen = []
    for rank in range(3):
        loader = DeviceLoader(data, 7, seed=1, rank=rank, world_size=3, drop_last=False)
        sizes = [len(y) for _, y in loader.epoch(0)]
        assert len(loader) == len(sizes) and sizes == ([7, 7, 1] if rank == 0 else [7, 7])
        seen += [int(image[0, 0, 0] * 255) for x, _ in loader.epoch(0) for image in x]
    assert sorted(seen) == list(range(43))


def test_exactly_one_batch_of_data_is_enough_for_drop_last():
    loader = DeviceLoader(indexed(8), 8, seed=0)
    assert len(loader) == 1 and [sorted(y.tolist()) for _, y in loader.epoch(0)] == [[0, 1, 2, 3, 4, 5, 6, 7]]
