"""Audit of lipnet.data.augment / synthetic / registry: the edge cases of the batched crop and flip."""

import pytest
import torch
from torch.nn import functional as F

from lipnet.data import random_crop_flip, synthetic_dataset


def _windows(x, padding):
    """Every (dy, dx, mirrored) window of each padded image, to identify an output."""
    padded = F.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    return {(dy, dx, m): padded[..., dy:dy + h, dx:dx + w].flip(-1) if m else padded[..., dy:dy + h, dx:dx + w]
            for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for m in (False, True)}


@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (3, 1, 2, 7), (2, 4, 1, 1)])
@pytest.mark.parametrize("padding, flip", [(0, True), (1, False), (3, True)])
def test_one_channel_non_square_and_single_images_are_windows_of_their_padded_input(shape, padding, flip):
    x = torch.randint(1, 256, shape, dtype=torch.uint8)
    out = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    windows = _windows(x, padding)
    for i in range(len(x)):
        assert any(torch.equal(out[i], win[i]) and (flip or not m) for (_, _, m), win in windows.items())


def test_offsets_are_uniform_and_flips_are_fair():
    n, padding = 30000, 2
    x = torch.zeros(n, 1, 5, 8, dtype=torch.uint8)
    x[..., 0] = 1  # the left edge: its column after the crop and the flip says both
    out = random_crop_flip(x, padding, True, torch.Generator().manual_seed(1))
    edge = out[:, 0].amax(1)  # (n, 8): the columns where the edge shows
    column = torch.where(edge.bool().any(1), edge.float().argmax(1), torch.full((n,), -1))
    counts = torch.bincount(column + 1, minlength=9).float() / n
    # left edge visible at columns 0..2 unflipped and 7..5 flipped (dx = 2, 1, 0), hidden for dx = 3, 4
    expected = torch.tensor([0.4, 0.1, 0.1, 0.1, 0, 0, 0.1, 0.1, 0.1])
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_the_same_generator_state_gives_the_same_crops_for_every_dtype():
    x = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    ref = random_crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        out = random_crop_flip(x.to(dtype), 2, True, torch.Generator().manual_seed(5))
        assert torch.equal(out.to(torch.uint8), ref), dtype


@pytest.mark.parametrize("padding", [-1, 1.5, True, "2"])
def test_bad_padding_and_shapes_are_refused(padding):
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(1, 1, 4, 4), padding)
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_crop_flip(torch.zeros(1, 4, 4), 1)


def test_an_empty_batch_and_white_images_stay_in_range():
    assert random_crop_flip(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), 2, True).shape == (0, 3, 4, 4)
    data = synthetic_dataset("cifar10", 8, noise=1.0)
    assert data.images.dtype == torch.uint8 and data.labels.tolist() == list(range(8))
    white = torch.full((2, 1, 3, 3), 255, dtype=torch.uint8)
    assert random_crop_flip(white, 1, True).max() == 255  # no wrap-around of the zero padding
