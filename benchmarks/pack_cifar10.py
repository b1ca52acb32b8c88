"""Repack CIFAR-10 into folders of under 64 MiB each, one per device call.

    python benchmarks/pack_cifar10.py [SOURCE] [DEST]
    python benchmarks/pack_cifar10.py --webp [SOURCE] [DEST]
    python benchmarks/pack_cifar10.py --unpack FILE DEST_DIR

SOURCE is any folder lipnet reads CIFAR-10 from (default ``../shared/data/cifar10``),
DEST defaults to ``.data`` (git-ignored).

Plain (three calls): ``DEST/s1/train-1-of-3.npz`` (images 0-19,999), ``DEST/s2/train-2-of-3.npz``
(20,000-39,999) and ``DEST/s3/train-3-of-3.npz`` (the last 10,000) plus ``DEST/s3/test.npz``:
about 56.5 MB each, so each fits one device call's 64 MiB beside the checkout.

``--webp`` (two calls): every image compressed losslessly as WebP (Pillow, 58% of the raw
bytes): ``DEST/w1/webp-train-1-of-2.npz`` (images 0-29,999) and ``DEST/w2/webp-train-2-of-2.npz``
plus ``DEST/w2/webp-test.npz``, about 54 MB per folder. ``--unpack`` (on the device, by
``benchmarks/gpu_check.sh stage``) decodes one such file (Pillow, or OpenCV where Pillow lacks
WebP) into the plain shard of the same name without the ``webp-`` prefix, and refuses it
unless the decoded images hash to the SHA-256 recorded at packing (lossless, checked).

Put together in one folder, the shards of either kind are read back as the original data set
(same images, same order). See "Taking the GPU figures" in docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np

#: Training images per folder; the test set goes with the last (smallest) one.
SPLITS = ((0, 20_000), (20_000, 40_000), (40_000, 50_000))
#: The same for WebP folders (two device calls).
WEBP_SPLITS = ((0, 30_000), (30_000, 50_000))
#: Prefix of a WebP-packed file; unpacked, the file keeps its name without it.
WEBP_PREFIX = "webp-"
#: What one device call carries in all: the working tree, the data folder and .data/site.
CALL_LIMIT_MIB = 64


def _parts(source: Path, splits):
    """``(folder index, file name, images NHWC uint8, labels int64)`` of each file to write."""
    from lipnet.data.sources import load_dataset

    train = load_dataset("cifar10", "train", data_dir=source)
    test = load_dataset("cifar10", "test", data_dir=source)
    if len(train) != splits[-1][1]:
        raise SystemExit(f"expected {splits[-1][1]} training images in {source}, found {len(train)}")
    for k, (lo, hi) in enumerate(splits, start=1):
        parts = [(f"train-{k}-of-{len(splits)}.npz", train, lo, hi)]
        if k == len(splits):
            parts.append(("test.npz", test, 0, len(test)))
        for name, data, a, b in parts:
            x = data.images[a:b].permute(0, 2, 3, 1).contiguous().numpy()  # uint8 NHWC
            yield k, name, x, data.labels[a:b].numpy().astype(np.int64)


def pack(source: Path, dest: Path, splits=SPLITS) -> list[Path]:
    """Write one folder ``s<k>`` per ``(start, stop)`` of ``splits``; returns the files written."""
    written = []
    for k, name, x, y in _parts(source, splits):
        path = dest / f"s{k}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=x, y=y)
        written.append(path)
    return written


def pack_webp(source: Path, dest: Path, splits=WEBP_SPLITS) -> list[Path]:
    """Write one folder ``w<k>`` per ``(start, stop)`` of ``splits``, every image a lossless
    WebP; returns the files written."""
    from PIL import Image

    written = []
    for k, name, x, y in _parts(source, splits):
        blobs = []
        for image in x:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="WEBP", lossless=True, quality=100, method=2, exact=True)
            blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        path = dest / f"w{k}" / f"{WEBP_PREFIX}{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, blobs=np.concatenate(blobs), offsets=offsets, shape=np.array(x.shape, dtype=np.int64), y=y,
                 sha256=np.frombuffer(hashlib.sha256(x.tobytes()).digest(), dtype=np.uint8))
        written.append(path)
    return written


def webp_decoder():
    """``bytes -> (H, W, 3) uint8 RGB array`` for one WebP image: Pillow's where it was built with
    WebP, else OpenCV's (the device image has both; a Pillow without libwebp would otherwise
    waste the call that carried the data). Lossless either way: the SHA-256 check tells."""
    try:
        from PIL import Image, features

        if features.check("webp"):
            return lambda blob: np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except ImportError:
        pass
    try:
        import cv2
    except ImportError:
        raise SystemExit("decoding WebP needs Pillow built with WebP support or OpenCV (cv2); neither is here") from None

    def decode(blob: bytes) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit("OpenCV could not decode a WebP image")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # OpenCV's channel order is BGR
    return decode


def unpack_webp(path: Path, dest_dir: Path) -> Path:
    """Decode one ``webp-*.npz`` file into ``dest_dir`` as the plain shard it was packed from."""
    path = Path(path)
    if not path.name.startswith(WEBP_PREFIX):
        raise SystemExit(f"{path} is not a WebP pack (its name does not start with {WEBP_PREFIX!r})")
    decode = webp_decoder()
    with np.load(path) as packed:
        blobs, offsets, shape, y, digest = (packed[k] for k in ("blobs", "offsets", "shape", "y", "sha256"))
    x = np.empty(tuple(int(s) for s in shape), dtype=np.uint8)
    for i in range(len(x)):
        x[i] = decode(blobs[offsets[i]:offsets[i + 1]].tobytes())
    if hashlib.sha256(x.tobytes()).digest() != digest.tobytes():
        raise SystemExit(f"{path}: the decoded images do not match the SHA-256 recorded at packing")
    out = Path(dest_dir) / path.name[len(WEBP_PREFIX):]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x, y=y)
    return out


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return 0
    if args[:1] == ["--unpack"]:
        if len(args) != 3:
            raise SystemExit("usage: pack_cifar10.py --unpack FILE DEST_DIR")
        out = unpack_webp(Path(args[1]), Path(args[2]))
        print(f"{out}  {out.stat().st_size / 1e6:.1f} MB")
        return 0
    webp = args[:1] == ["--webp"]
    args = args[1:] if webp else args
    source = Path(args[0]) if args else Path("../shared/data/cifar10")
    dest = Path(args[1]) if len(args) > 1 else Path(".data")
    written = (pack_webp if webp else pack)(source, dest)
    for path in written:
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
    for folder in sorted({path.parent for path in written}):
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB of the {CALL_LIMIT_MIB} MiB a device call carries, with the "
              "checkout and .data/site")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
