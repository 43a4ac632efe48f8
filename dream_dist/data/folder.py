"""Image folders: the generic ImageFolder layout and TinyImageNet's own layout.

ImageFolder: root/<split>/<class>/<image> (or root/<class>/<image> when there is no split
folder); classes in sorted order. TinyImageNet: class order from wnids.txt (the
conventional index), train/<wnid>/images/*.JPEG, val/images/* labelled by
val/val_annotations.txt. Grayscale images are converted to RGB.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dream_dist.data.base import ImageSet
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def decode_image(path: Path, mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """Decode one file to uint8 (C, H, W), converting to `mode` ('RGB' or 'L')."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_all(paths: list[Path], mode: str, size: int | None, on_corrupt: str = "error") -> tuple[torch.Tensor, list[int]]:
    """(uint8 images, indices of `paths` decoded). on_corrupt="skip" leaves out the files that
    cannot be decoded, logging their count and names; "error" raises on the first."""
    if on_corrupt not in ("error", "skip"):
        raise ConfigError(f"dataset.on_corrupt: unknown {on_corrupt!r}; choose one of error, skip")

    def one(p: Path):
        try:
            return decode_image(p, mode, size)
        except DataError:
            if on_corrupt == "error":
                raise
            return None

    # PIL releases the GIL while decoding, so threads help on multi-core machines.
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(one, paths))
    kept = [i for i, a in enumerate(decoded) if a is not None]
    bad = [str(paths[i]) for i, a in enumerate(decoded) if a is None]
    if bad:
        log.warning("skipped %d corrupt image(s) (dataset.on_corrupt=skip): %s", len(bad),
                    ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
    arrays = [decoded[i] for i in kept]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:3]}...; pass size=N to resize")
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return images, kept


def load_imagefolder(root: Path, split: str, mode: str = "RGB", size: int | None = None,
                     on_corrupt: str = "error") -> ImageSet:
    base = root / split if (root / split).is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{base}: no class folders found (expected <root>/<class>/<images>)")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (base / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        paths += files
        labels += [c] * len(files)
    images, kept = _decode_all(paths, mode, size, on_corrupt)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64)[kept], classes)


def load_tinyimagenet(root: Path, split: str, names: bool = False, on_corrupt: str = "error") -> ImageSet:
    wnids_file = root / "wnids.txt"
    if not wnids_file.exists():
        raise DataNotFoundError(f"{wnids_file} not found: not a TinyImageNet directory")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for w in wnids:
            files = sorted((root / "train" / w / "images").glob("*.JPEG"))
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.exists():
            raise DataNotFoundError(f"{ann} not found")
        for line in ann.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) < 2:
                continue
            if cols[1] not in index:
                raise DataError(f"{ann}: unknown wnid {cols[1]!r} for {cols[0]}")
            paths.append(root / "val" / "images" / cols[0])
            labels.append(index[cols[1]])
    images, kept = _decode_all(paths, "RGB", None, on_corrupt)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64)[kept], wnids)
