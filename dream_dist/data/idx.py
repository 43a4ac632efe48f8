"""MNIST and Fashion-MNIST from their original IDX .gz files.

IDX: big-endian int32 magic (2051 images, 2049 labels), then counts and dimensions, then
raw uint8. We validate the header against the file length so a truncated or wrong file
fails with its name instead of producing garbage.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from dream_dist.data.base import ImageSet
from dream_dist.errors import DataError, DataNotFoundError

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class IDXError(DataError):
    """A malformed IDX file."""


def _open(path: Path) -> bytes:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.exists():
            if p.suffix == ".gz":
                try:
                    with gzip.open(p, "rb") as f:
                        return f.read()
                except (OSError, EOFError) as e:
                    raise IDXError(f"{p}: not a readable gzip file ({e})") from e
            return p.read_bytes()
    raise DataNotFoundError(f"IDX file {path}(.gz) not found")


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (optionally .gz) into a uint8 array, validating its header."""
    path = Path(path)
    data = _open(path)
    if len(data) < 8:
        raise IDXError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    magic, n = struct.unpack(">II", data[:8])
    if magic != expect_magic:
        raise IDXError(
            f"{path}: bad IDX magic number {magic} (expected {expect_magic}: "
            f"{'images' if expect_magic == 2051 else 'labels'})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise IDXError(
            f"{path}: header says {dims} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_pair(root: Path, split: str, classes: list[str]) -> ImageSet:
    split = "test" if split == "val" else split
    img_name, lbl_name = _FILES[split]
    images = read_idx(root / img_name, 2051)
    labels = read_idx(root / lbl_name, 2049)
    if images.shape[0] != labels.shape[0]:
        raise IDXError(
            f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}"
        )
    if labels.max() >= len(classes):
        raise IDXError(f"{root / lbl_name}: label {labels.max()} out of range for {len(classes)} classes")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(x, y, classes)


def load_mnist(root: Path, split: str) -> ImageSet:
    return load_idx_pair(root, split, [str(i) for i in range(10)])


def load_fashion(root: Path, split: str) -> ImageSet:
    return load_idx_pair(root, split, list(FASHION_CLASSES))
