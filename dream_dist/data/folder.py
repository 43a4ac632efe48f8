"""Image files: decoding (with resize), listings of the ImageFolder and TinyImageNet layouts,
and in-memory loading of them.

ImageFolder: root/<split>/<class>/<image> (or root/<class>/<image> when there is no split
folder); classes in sorted order. TinyImageNet: class order from wnids.txt (the
conventional index), train/<wnid>/images/*.JPEG, val/images/* labelled by
val/val_annotations.txt. Grayscale images are converted to RGB.

A listing is a `FileSource` (class names + each class's files, nothing decoded): what the
streaming pack (dream_dist.data.stream) and the in-memory loaders here both start from.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dream_dist.data.base import ImageSet
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# The PIL formats of those extensions (MPO: multi-picture JPEGs from cameras). PIL identifies a
# file by its content, not its name: unrestricted, an EPS file named x.png would be rendered by
# Ghostscript, a PostScript interpreter, i.e. a program from the data directory would run.
PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "WEBP", "GIF", "TIFF")


def decode_image(path: Path, mode: str = "RGB", size: int | None = None, resize: str = "square",
                 jpeg_draft: bool = True) -> np.ndarray:
    """Decode one file to uint8 (C, H, W) in `mode` ('RGB' or 'L'). With `size`: stretched to
    size x size ("square"), or the shorter side scaled to `size` and centre-cropped ("shorter",
    ImageNet's usual preparation); unchanged when size is None.

    jpeg_draft (with `size`): a JPEG at least twice `size` on both sides is decoded by libjpeg
    at 1/2, 1/4 or 1/8 scale (its DCT scaling; PIL's `draft`), never below `size`, and then
    resized: about half the decode time of a 500 x 375 photo at size 64 (benchmarks/
    imagenet_model.py), slightly different pixels from a full decode. Other formats, and
    JPEGs under 2 x size, decode the same either way."""
    from PIL import Image

    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            if size is not None and jpeg_draft and im.format == "JPEG":
                im.draft(mode, (size, size))
            im = im.convert(mode)
            if size is not None:
                w, h = im.size
                if resize == "square":
                    if (w, h) != (size, size):
                        im = im.resize((size, size), Image.BILINEAR)
                else:
                    s = size / min(w, h)
                    nw, nh = max(size, round(w * s)), max(size, round(h * s))
                    im = im.resize((nw, nh), Image.BILINEAR)
                    left, top = (nw - size) // 2, (nh - size) // 2
                    im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_files(paths: list[Path], mode: str = "RGB", size: int | None = None, resize: str = "square",
                 on_corrupt: str = "error", jpeg_draft: bool = True) -> tuple[torch.Tensor, list[int]]:
    """(uint8 images, indices of `paths` decoded). on_corrupt="skip" leaves out the files that
    cannot be decoded, logging their count and names; "error" raises on the first."""
    if on_corrupt not in ("error", "skip"):
        raise ConfigError(f"dataset.on_corrupt: unknown {on_corrupt!r}; choose one of error, skip")

    def one(p: Path):
        try:
            return decode_image(p, mode, size, resize, jpeg_draft)
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


# ---------------------------------------------------------------------------- listings (nothing decoded)


@dataclass
class FileSource:
    """An image-file source without decoding anything: class names in label order and the
    sorted file list of each class."""

    name: str
    classes: list[str]
    files: list[list[Path]]

    def class_fingerprint(self, c: int) -> str:
        """Class `c`'s name and its files' paths, sizes and mtimes: a cheap identity (no pixel read)."""
        h = hashlib.sha256(f"{c}\0{self.classes[c]}\n".encode())
        for f in self.files[c]:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def fingerprint(self, class_fingerprints: list[str] | None = None) -> str:
        """The whole source's identity: its name, class count and every class's fingerprint
        (pass them when already computed)."""
        fps = class_fingerprints or [self.class_fingerprint(c) for c in range(len(self.classes))]
        h = hashlib.sha256(f"{len(self.classes)}\n".encode())
        for fp in fps:
            h.update(fp.encode())
        return f"{self.name}:{h.hexdigest()}"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def imagefolder_source(root: str | Path, split: str) -> FileSource:
    """<root>/<split>/<class>/<images> (or <root>/<class>/<images>), classes sorted."""
    root = Path(root)
    base = root / split if (root / split).is_dir() else root
    if not base.is_dir():
        raise DataNotFoundError(f"dataset.root: {base} is not a directory")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{base}: no class folders found (expected <root>/<class>/<images>)")
    return FileSource("imagefolder", classes, [_images_in(base / c) for c in classes])


def read_synsets(path: str | Path) -> list[str]:
    """wnids in class order from a synset list: `<wnid>[ <words>]` per line (LOC_synset_mapping.txt)."""
    wnids = [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{path}: lists no synsets")
    return wnids


def tinyimagenet_source(root: str | Path, split: str) -> FileSource:
    """TinyImageNet: wnids.txt order, train/<wnid>/images/*.JPEG, val labelled by
    val/val_annotations.txt."""
    root = Path(root)
    wnids_file = root / "wnids.txt"
    if not wnids_file.exists():
        raise DataNotFoundError(f"{wnids_file} not found: not a TinyImageNet directory")
    wnids = read_synsets(wnids_file)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        return FileSource("tinyimagenet", wnids, [sorted((root / "train" / w / "images").glob("*.JPEG")) for w in wnids])
    ann = root / "val" / "val_annotations.txt"
    if not ann.exists():
        raise DataNotFoundError(f"{ann} not found")
    files: list[list[Path]] = [[] for _ in wnids]
    for line in ann.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 2:
            if cols[1] not in index:
                raise DataError(f"{ann}: unknown wnid {cols[1]!r} for {cols[0]}")
            files[index[cols[1]]].append(root / "val" / "images" / cols[0])
    return FileSource("tinyimagenet", wnids, files)


# ---------------------------------------------------------------------------- decoded in memory


def decode_source(source: FileSource, size: int | None = None, resize: str = "shorter", on_corrupt: str = "error",
                  mode: str = "RGB", jpeg_draft: bool = True) -> ImageSet:
    """The whole source decoded in memory, class by class (small sources and tests; packing
    streams instead: dream_dist.data.stream.pack_files)."""
    paths = [p for files in source.files for p in files]
    labels = torch.tensor([c for c, files in enumerate(source.files) for _ in files], dtype=torch.int64)
    images, kept = decode_files(paths, mode, size, resize, on_corrupt, jpeg_draft)
    return ImageSet(images, labels[kept], list(source.classes))


def load_imagefolder(root: Path, split: str, mode: str = "RGB", size: int | None = None,
                     on_corrupt: str = "error") -> ImageSet:
    return decode_source(imagefolder_source(root, split), size, "square", on_corrupt, mode)


def load_tinyimagenet(root: Path, split: str, names: bool = False, on_corrupt: str = "error") -> ImageSet:
    return decode_source(tinyimagenet_source(root, split), on_corrupt=on_corrupt)
