"""Repack CIFAR-10 into three folders of under 64 MiB each, one per device call.

    python benchmarks/pack_cifar10.py [SOURCE] [DEST]

SOURCE is any folder lipnet reads CIFAR-10 from (default ``../shared/data/cifar10``),
DEST defaults to ``.data`` (git-ignored). It writes ``DEST/s1/train-1-of-3.npz`` (images
0-19,999), ``DEST/s2/train-2-of-3.npz`` (20,000-39,999) and ``DEST/s3/train-3-of-3.npz``
(the last 10,000) plus ``DEST/s3/test.npz``: about 56.5 MB each, so each fits one device
call's 64 MiB beside the checkout. Put together in one folder they are read back as the
original data set (same images, same order). See "Taking the GPU figures" in
docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lipnet.data.sources import load_dataset

#: Training images per folder; the test set goes with the last (smallest) one.
SPLITS = ((0, 20_000), (20_000, 40_000), (40_000, 50_000))


def pack(source: Path, dest: Path, splits=SPLITS) -> list[Path]:
    """Write one folder per ``(start, stop)`` of ``splits``; returns the files written."""
    train = load_dataset("cifar10", "train", data_dir=source)
    test = load_dataset("cifar10", "test", data_dir=source)
    if len(train) != splits[-1][1]:
        raise SystemExit(f"expected {splits[-1][1]} training images in {source}, found {len(train)}")
    written = []
    for k, (lo, hi) in enumerate(splits, start=1):
        folder = dest / f"s{k}"
        folder.mkdir(parents=True, exist_ok=True)
        parts = [(f"train-{k}-of-{len(splits)}.npz", train, lo, hi)]
        if k == len(splits):
            parts.append(("test.npz", test, 0, len(test)))
        for name, data, a, b in parts:
            x = data.images[a:b].permute(0, 2, 3, 1).contiguous().numpy()  # uint8 NHWC
            y = data.labels[a:b].numpy().astype(np.int64)
            np.savez_compressed(folder / name, x=x, y=y)
            written.append(folder / name)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path("../shared/data/cifar10")
    dest = Path(args[1]) if len(args) > 1 else Path(".data")
    for path in pack(source, dest):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
